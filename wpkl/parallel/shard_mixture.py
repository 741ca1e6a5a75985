"""Several logits teachers on vocabulary shards (wpkl.multi_teacher_loss with ``process_group``, reverse or forward
KL; the fused-linear form's hidden-state teachers chunk by chunk, wpkl/engine/mixture.py: LinearMixtureAdapter):
each rank's kernels read its slice of the student once per group of up to MAX_TEACHERS teachers
(kernels/token_mixture.py), and one ``merge_kernel_stats`` call (two all-reduces, whatever the number of teachers)
makes every teacher's statistics the whole vocabulary's; the backward kernels then need no collective.

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
from ..backends.triton_mixture import TritonMixturePass, element_grid, max_teachers
from ..backends.triton_pass import TritonPass
from ..backends.triton_sampled import SampledMixtureSaved, TritonSampledMixturePass, _teacher_pass
from ..backends.triton_topk import _stat, shared_student_pass
from ..spec import LossSpec
from .merge import merge_kernel_stats
from .vocab import local_tokens, owned_logit


def launches(teachers, spec: LossSpec) -> list[tuple[int, ...]]:
    """The teachers' indices each kernel launch takes: teachers of one dtype and element grid, up to the
    mixture kernel's slots (a launch of one runs the single-teacher kernel)."""
    keys: dict[tuple, list[int]] = {}
    for k, teacher in enumerate(teachers):
        keys.setdefault((teacher.dtype, element_grid(teacher)), []).append(k)
    size = max_teachers(spec)
    return [tuple(members[i: i + size]) for members in keys.values() for i in range(0, len(members), size)]


@dataclass
class ShardedMixtureSaved:
    """What backward needs; ``student`` and ``teachers`` may be dropped after forward and attached again (the
    fused-linear form recomputes them chunk by chunk): the launches' states hold neither."""

    student: torch.Tensor | None
    teachers: list | None
    parts: list  # (the launch's teacher indices, its pass's saved state with the merged statistics)


class ShardedMixturePass:
    """The mixture passes' contract (wpkl/backends/triton_mixture.py) on this rank's vocabulary slice."""

    def __init__(self, shard):
        self.shard = shard

    def forward(self, student, teachers, valids, spec: LossSpec):
        k = kernels()
        B, T, _ = student.shape
        K, N = len(teachers), B * T
        stats = common.new_buffer(K, k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        parts = []
        for members in launches(teachers, spec):
            index = list(members)
            if len(members) == 1:
                _, _, saved = TritonPass.forward(student, teachers[index[0]], valids[index[0]], None, None, None, spec)
                stats[index[0]] = saved.stats
            else:
                _, _, saved = TritonMixturePass.forward(student, [teachers[i] for i in index], valids[index], spec)
                stats[index] = saved.stats
            parts.append((index, replace(saved, student=None, **{"teacher" if len(index) == 1 else "teachers": None})))
        # every teacher's statistics in one merge: [NUM_STATS, K * N], teacher-major within each row
        flat = stats.transpose(0, 1).reshape(k.NUM_STATS, K * N)
        loss = merge_kernel_stats(flat, valids.reshape(K * N), spec.exact_divergence, spec.temperature, self.shard)
        merged = flat.view(k.NUM_STATS, K, N).transpose(0, 1)
        for index, saved in parts:  # what each launch's backward kernel reads: the whole vocabulary's statistics
            saved.stats.copy_(merged[index[0]] if len(index) == 1 else merged[index])
        public = merged[:, : k.NUM_PUBLIC_STATS].reshape(K, k.NUM_PUBLIC_STATS, B, T)
        return loss.view(K, B, T), public, ShardedMixtureSaved(student, list(teachers), parts)

    @staticmethod
    def backward(saved: ShardedMixtureSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The launches' gradients summed into ``out``. ``out`` may be the student logits' own storage (the
        fused-linear form's chunks), so the first launch writes it last: the others (teachers of another dtype
        or past the kernel's slots) write a buffer first (a second one for a third launch, added in), which is
        then added to it (as autograd adds separate passes' gradients: in half precision such elements round
        twice)."""
        def run(index, part, target):
            if len(index) == 1:
                TritonPass.backward(replace(part, student=saved.student, teacher=saved.teachers[index[0]]),
                                    coef[index[0]], target)
            else:
                TritonMixturePass.backward(replace(part, student=saved.student,
                                                   teachers=[saved.teachers[i] for i in index]), coef[index], target)

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
