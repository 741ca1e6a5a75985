"""Several logits teachers on vocabulary shards (wpkl.multi_teacher_loss with ``process_group``, reverse or forward
KL or jsd; the fused-linear form's hidden-state teachers chunk by chunk, wpkl/engine/mixture.py:
LinearMixtureAdapter): each rank's kernels read its slice of the student once per group of up to MAX_TEACHERS
teachers (MAX_JSD_TEACHERS; kernels/token_mixture.py), and one ``merge_kernel_stats`` call (two all-reduces,
whatever the number of teachers) makes every teacher's statistics the whole vocabulary's (jsd: then its second
pass on the slice and one all-reduce of its sums, ``_jsd_sums``; top-k teachers beside them: a student merge and a
gather of their atoms, three more); the backward kernels then need no collective.

    forward(student [B, T, V_local], teachers [K of [B, T, V_local]], valids [K, B, T], spec) -> loss [K, B, T],
            stats [K, 4, B, T], saved
    backward(saved, coef [K, B, T], out [B, T, V_local])

The collectives depend only on what every rank agreed (wpkl/parallel/agree.py: the teachers, their routes and
the plan): how a rank splits its teachers into kernel launches (by dtype and element grid, local facts of its
tensors) changes no collective.

``ShardedSampledMixturePass``: the sampled-token loss's logits and log q(y) teachers the same way
(wpkl/backends/triton_sampled.py's pass on the slice, one merge per form of teacher).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..backends import common
from ..backends.common import kernels
from ..backends.triton_logits_topk import LogitsTopKSaved, TritonLogitsTopKPass
from ..backends.common import divergence_id
from ..backends.triton_mixture import TritonMixturePass, element_grid, jsd_partials, max_teachers
from ..backends.triton_pass import TritonPass, TritonSaved
from ..backends.triton_pass import jsd_partials as single_jsd_partials
from ..backends.triton_sampled import SampledMixtureSaved, TritonSampledMixturePass, _teacher_pass
from ..backends.triton_topk import _stat, gather_atoms, shared_student_pass, topk_atoms
from ..reference import TopK
from ..spec import LossSpec
from .merge import merge_jsd, merge_kernel_stats
from .shard_topk import merge_student
from .vocab import local_tokens, owned_logit


def launches(teachers, spec: LossSpec) -> list[tuple[int, ...]]:
    """The teachers' indices each kernel launch takes: teachers of one dtype and element grid, up to the
    mixture kernel's slots (a launch of one runs the single-teacher kernel)."""
    keys: dict[tuple, list[int]] = {}
    for k, teacher in enumerate(teachers):
        keys.setdefault((teacher.dtype, element_grid(teacher)), []).append(k)
    size = max_teachers(spec)
    return [tuple(members[i: i + size]) for members in keys.values() for i in range(0, len(members), size)]


def _jsd_sums(parts, merged, K: int, N: int, spec: LossSpec) -> torch.Tensor:
    """Every launch's jsd second pass on the slice (kernels/token_divergence_fwd.py's and token_mixture.py's
    partials kernels) with the merged statistics: [4, K * N] fp32, teacher-major as the merge's view."""
    sums = torch.empty(K, 4, N, dtype=torch.float32, device=merged.device)
    for index, saved in parts:
        if isinstance(saved, TritonSaved):
            sums[index[0]] = single_jsd_partials(saved.student, saved.teacher, saved.valid_bytes,
                                                 merged[index[0]].contiguous(), spec)
        else:
            sums[index] = jsd_partials(replace(saved, stats=merged[index].contiguous(), spec=spec))
    return sums.transpose(0, 1).reshape(4, K * N)


@dataclass
class ShardedMixtureSaved:
    """What backward needs; ``student`` and ``teachers`` may be dropped after forward and attached again (the
    fused-linear form recomputes them chunk by chunk): the launches' states hold neither."""

    student: torch.Tensor | None
    teachers: list | None
    parts: list  # (the launch's teacher indices, its pass's saved state with the merged statistics)


class ShardedMixturePass:
    """The mixture passes' contract (wpkl/backends/triton_mixture.py) on this rank's vocabulary slice. Top-k
    teachers after the logits ones (the plan's "shards+top-k") join the first launch as on one device
    (wpkl/backends/triton_logits_topk.py): its kernel writes the student's slice terms in teacher 0's slot on their
    tokens too, which one student merge makes the whole vocabulary's (``merge_student``) before their atoms are
    gathered (once for all) and their atom math runs; backward, that launch adds their dense part and rewrites
    their atoms (this rank's) as on one device."""

    def __init__(self, shard):
        self.shard = shard

    def forward(self, student, teachers, valids, spec: LossSpec):
        k = kernels()
        B, T, _ = student.shape
        N = B * T
        topk = [t for t in teachers if isinstance(t, TopK)]
        K = len(teachers) - len(topk)  # the logits teachers, first
        valids = valids.reshape(len(teachers), N)
        rows = valids[K:].any(0).to(torch.int8) if topk else None  # the top-k teachers' tokens
        jsd = spec.exact_divergence == "jsd"
        first = spec.replace(divergence="reverse_kl") if jsd else spec  # jsd: its normalizers first
        stats = common.new_buffer(K, k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        parts = []
        for members in launches(teachers[:K], spec):
            index = list(members)
            if len(members) == 1 and (parts or rows is None):
                _, _, saved = TritonPass.forward(student, teachers[index[0]], valids[index[0]], None, None, None,
                                                 first)
                stats[index[0]] = saved.stats
            else:  # (the first launch takes the top-k teachers' rows: teacher 0, whose slot holds the student's)
                _, _, saved = TritonMixturePass.forward(student, [teachers[i] for i in index], valids[index], first,
                                                        rows=None if parts else rows)
                stats[index] = saved.stats
            parts.append((index, saved))
        own = stats[0].clone() if topk else None  # the student's slice terms on the top-k teachers' rows
        # every teacher's statistics in one merge: [NUM_STATS, K * N], teacher-major within each row
        flat = stats.transpose(0, 1).reshape(k.NUM_STATS, K * N)
        valid = valids[:K].reshape(K * N)
        loss = merge_kernel_stats(flat, valid, first.exact_divergence, spec.temperature, self.shard)
        merged = flat.view(k.NUM_STATS, K, N).transpose(0, 1)
        if jsd:  # the second pass of every launch on the slice with the merged normalizers, one all-reduce of its sums
            loss = merge_jsd(flat, _jsd_sums(parts, merged, K, N, spec), valid, spec.beta, self.shard)
        parts = [(index, replace(saved, student=None, div_id=divergence_id(spec.exact_divergence), spec=spec,
                                 **{"teacher" if isinstance(saved, TritonSaved) else "teachers": None}))
                 for index, saved in parts]
        public = torch.where(valids[:K, None], merged[:, : k.NUM_PUBLIC_STATS], 0.0)  # (teacher 0: its own tokens)
        if topk:
            # the student's slice terms on the top-k teachers' rows, merged: teacher 0's slot there (what the first
            # launch's backward reads) and the atom math's; every top-k teacher's atoms gathered at once
            merge_student(own, rows != 0, spec.temperature, self.shard)
            extra = (rows != 0) & ~valids[0]
            for name in ("STAT_STUDENT_LSE", "STAT_STUDENT_ENTROPY"):
                merged[0, _stat(name)] = torch.where(extra, own[_stat(name)], merged[0, _stat(name)])
            ids = [t.ids.reshape(N, t.ids.shape[-1]).to(torch.int64) for t in topk]
            atoms = [topk_atoms(student, own, t, valid.view(B, T), spec, self.shard, x)
                     for t, valid, x in zip(topk, valids[K:], gather_atoms(student, ids, self.shard), strict=True)]
            loss = torch.cat([loss.view(K, N), torch.stack([a[0] for a in atoms])])
            public = torch.cat([public, torch.stack([a[1] for a in atoms])])
            index, first = parts[0]
            members = index + list(range(K, len(teachers)))
            parts[0] = (members, LogitsTopKSaved(None, None, first, [a[2] for a in atoms],
                                                 torch.stack([a[3] for a in atoms]).to(torch.float32),
                                                 valids[members], rows, spec))
        for index, saved in parts:  # what each launch's backward kernel reads: the whole vocabulary's statistics
            state = saved.mixture if isinstance(saved, LogitsTopKSaved) else saved
            logits = index[: len(index) - len(topk)] if isinstance(saved, LogitsTopKSaved) else index
            state.stats.copy_(merged[logits[0]] if state.stats.dim() == 2 else merged[logits])
        public = public.reshape(len(teachers), k.NUM_PUBLIC_STATS, B, T)
        return loss.view(len(teachers), B, T), public, ShardedMixtureSaved(student, list(teachers[:K]), parts)

    @staticmethod
    def backward(saved: ShardedMixtureSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The launches' gradients summed into ``out``. ``out`` may be the student logits' own storage (the
        fused-linear form's chunks), so the first launch writes it last: the others (teachers of another dtype
        or past the kernel's slots) write a buffer first (a second one for a third launch, added in), which is
        then added to it (as autograd adds separate passes' gradients: in half precision such elements round
        twice)."""
        def run(index, part, target):
            if isinstance(part, TritonSaved):
                TritonPass.backward(replace(part, student=saved.student, teacher=saved.teachers[index[0]]),
                                    coef[index[0]], target)
                return
            logits = [saved.teachers[i] for i in index if i < len(saved.teachers)]
            pass_ = TritonLogitsTopKPass if isinstance(part, LogitsTopKSaved) else TritonMixturePass
            pass_.backward(replace(part, student=saved.student, teachers=logits), coef[index], target)

        (first, *others), rest = saved.parts, None
        for n, (index, part) in enumerate(others):
            target = torch.empty_like(out)
            run(index, part, target)
            rest = target if n == 0 else rest.add_(target)
        run(*first, out)
        return out if rest is None else out.add_(rest)


class ShardedSampledMixturePass:
    """Several teachers of the sampled-token loss on vocabulary shards (wpkl/backends/triton_sampled.py's pass on
    this rank's slice): the student pass once, each logits teacher's pass on its own tokens, then one merge for
    the logits teachers and one for the log q(y) teachers (each form's statistics at once: which merges run is
    the agreed plan's), and one "sampled" backward kernel with the multiplier sum_k c_k (-a_k)."""

    def __init__(self, shard):
        self.shard = shard

    def forward(self, student, teachers, valids, spec: LossSpec):
        k = kernels()
        B, T, V = student.shape
        K, N = len(teachers), B * T
        valids, valid_bytes, own = shared_student_pass(student, valids, K, spec)
        tokens = local_tokens(teachers[0].tokens.reshape(N), self.shard)
        s_y = owned_logit(student, tokens.view(B, T)).reshape(-1)
        rollout = teachers[0].rollout
        loss = common.new_buffer(K, N, dtype=torch.float32, device=student.device)
        merged = common.new_buffer(K, k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        rows = [_stat(name) for name in ("STAT_TEACHER_LSE", "STAT_CONFIDENCE", "STAT_TEACHER_ENTROPY")]
        for logits in (True, False):
            members = [i for i, t in enumerate(teachers) if (t.logits is not None) == logits]
            if not members:
                continue
            columns, u_y = [], []
            for i in members:
                column = own.clone()  # the student's slice statistics, and the teacher's (a logits teacher's pass)
                if logits:
                    u = teachers[i].logits[..., :V]
                    column[rows] = _teacher_pass(u, valids[i].to(torch.int8), tokens, spec)[rows]
                    u_y.append(owned_logit(u, tokens.view(B, T)).reshape(-1))
                columns.append(column)
            M = len(members)
            flat = torch.stack(columns, 1).reshape(k.NUM_STATS, M * N)
            server = None if logits else torch.cat([teachers[i].logprobs.reshape(N) for i in members])
            loss[members] = merge_kernel_stats(
                flat, valids[members].reshape(M * N), "sampled", spec.temperature, self.shard, s_y.repeat(M),
                torch.cat(u_y) if logits else None, server, None if rollout is None else rollout.reshape(N).repeat(M),
                power=spec.sampled_power).view(M, N)
            merged[members] = flat.view(k.NUM_STATS, M, N).transpose(0, 1)
        lse = torch.where(valids, merged[:, _stat("STAT_STUDENT_LSE")], float("-inf")).amax(0)
        own[_stat("STAT_STUDENT_LSE")] = torch.where(valid_bytes != 0, lse, 0.0)  # the whole vocabulary's
        multipliers = torch.where(valids, merged[:, _stat("STAT_AUX")], 0.0)
        # (the one-device pass's state: its backward kernel then runs on the slice, with this rank's token columns)
        saved = SampledMixtureSaved(student, valid_bytes, tokens, own, multipliers, valids, spec)
        public = merged[:, : k.NUM_PUBLIC_STATS].reshape(K, k.NUM_PUBLIC_STATS, B, T)
        return loss.view(K, B, T), public, saved

    backward = staticmethod(TritonSampledMixturePass.backward)  # no collective: the merged lse is all it needs
