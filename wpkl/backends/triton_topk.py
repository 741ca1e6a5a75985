"""Top-k teachers on the Triton kernels: the student row is read once forward (the forward kernel as "sampled"
without teacher logits gives the student's log-normalizer and entropy, which no top-k teacher changes), the atom
math of the specification runs on [N, K] tensors, and backward is the sampled backward kernel (the dense part)
plus kernels/token_topk.py's fix-up of the atoms.

    TritonTopKPass         one teacher: the Triton pass's contract (triton_pass.py)
    TritonTopKMixturePass  several teachers (wpkl.multi_teacher_loss with dense mixing), one read of the student
                           for all of them: forward(student, teachers [K of TopK], valids [K, B, T], spec) ->
                           loss [K, B, T], stats [K, 4, B, T], saved; backward(saved, coef [K, B, T], out)

Several teachers' gradient, by linearity, with c_k = d loss / d L_k of the token and each teacher's
A_k = dF_k/dx, Lambda_k = dF_k/dlse (kernels/token_topk.py):

    d loss / d s_v = (p_v sum_k c_k Lambda_k + sum_k [v in S_k] c_k A_k,v) / T

one dense pass with Lambda = sum_k c_k Lambda_k and the atoms of all teachers as one list, an id that several
teachers give merged into one atom with its summed c_k A_k (``merge_atoms``), so that each column is written
once and rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import TopK, topk_atom_terms
from ..reference.vocab import owned_values
from ..spec import LossSpec
from . import common
from .common import divergence_id, kernels, launch
from .triton_pass import TritonPass, TritonSaved, forward_launch


@dataclass
class TopKSaved:
    """A top-k teacher's backward inputs, [N, K] each (the row terms are in the stats: see ``topk_forward``)."""

    ids: torch.Tensor  # int64, -1 pads
    x: torch.Tensor  # fp32 s_j / T at the ids
    atom_grad: torch.Tensor  # fp32 A = dF/dx


def _stat(name: str) -> int:
    from ..kernels import common as rows

    return int(getattr(rows, name).value)


def student_pass(student, valid_bytes, spec: LossSpec):
    """The forward kernel as "sampled" without teacher logits on the rows where ``valid_bytes`` [N] is set: the
    stats buffer [NUM_STATS, N] with the student's T lse (STAT_STUDENT_LSE) and entropy. The kernel's
    sampled-token slot is column 0 (its loss is discarded; it reads the unused log q(y) slot from the loss
    buffer)."""
    k = kernels()
    B, T, V = student.shape
    N = B * T
    loss = common.new_buffer(N, dtype=torch.float32, device=student.device)
    stats = common.new_buffer(k.NUM_STATS, N, dtype=torch.float32, device=student.device)
    if N > 0:
        slot = torch.zeros(N, dtype=torch.int64, device=student.device)
        grid, args, meta = forward_launch(student, None, valid_bytes, slot, loss, None, loss, stats,
                                          divergence_id("sampled"), spec.beta, spec.temperature)
        launch(k.token_divergence_fwd_kernel, grid, args, meta)
    return stats


def shared_student_pass(student, valids, K: int, spec: LossSpec):
    """K teachers' student pass (TritonTopKMixturePass, triton_sampled.py): (valids [K, N], the rows some teacher
    sees as int8 [N], ``student_pass``'s stats on them)."""
    B, T, _ = student.shape
    valids = valids.reshape(K, B * T)
    valid_bytes = valids.any(0).to(torch.int8)
    return valids, valid_bytes, student_pass(student, valid_bytes, spec)


def gather_atoms(student, ids: list, shard=None) -> list:
    """The student's raw logits at several teachers' ids (``ids``: [N, K_k] int64 each, global on vocabulary
    shards) as float32 [N, K_k] each, padding and out-of-range ids reading some column (the caller masks them).
    ``shard`` (wpkl/parallel/vocab.py's VocabShard): the rank that holds an id supplies its logit and the others 0,
    one all-reduce of [N, sum K_k] for every teacher (exact in any dtype: one rank's value per element)."""
    B, T, V = student.shape
    every = torch.cat(ids, dim=1)
    every = every.view(B, T, every.shape[1])
    if shard is None:
        x = student.gather(-1, every.clamp(0, max(V - 1, 0)))
    else:
        x = shard.sum(owned_values(student, every, shard))
    return list(x.reshape(B * T, every.shape[2]).to(torch.float32).split([i.shape[1] for i in ids], dim=1))


def local_atoms(ids: torch.Tensor, shard) -> torch.Tensor:
    """Global ids as the slice's columns, -1 where another rank holds the id (the atoms kernel writes columns in
    [0, V_local) only)."""
    if shard is None:
        return ids
    local = ids - shard.offset
    return torch.where((ids >= 0) & (local >= 0) & (local < shard.size), local, -1)


def topk_atoms(student, stats, teacher: TopK, valid, spec: LossSpec, shard=None, gathered=None):
    """One teacher's atom math (wpkl/reference/topk.py ``topk_atom_terms``) on [N, K] tensors under autograd, on
    the rows where ``valid`` [B, T] is set, from the student pass's ``stats`` (on vocabulary shards: merged over
    the group, the whole vocabulary's): (loss [N], public stats [4, N], TopKSaved, Lambda [N]), each 0 on the other
    rows. No [N, V] tensor is made. ``gathered``: ``gather_atoms``'s for this teacher, when already made."""
    B, T, V = student.shape
    N, K = B * T, teacher.ids.shape[-1]
    vocab = V if shard is None else shard.vocab
    ids = teacher.ids.reshape(N, K).to(torch.int64).contiguous()  # the atoms kernel indexes row * K + k
    valid_flat = valid.reshape(N, 1)
    in_range = (ids >= -1) & (ids < vocab)
    gathered = gather_atoms(student, [ids], shard)[0] if gathered is None else gathered
    # An id >= V (the value checks report it) gives its row a NaN loss, never a number from another column; ids
    # below -1 are padding, as in the specification (and reported by the checks too).
    x = torch.where(in_range | ~valid_flat, gathered / spec.temperature, float("nan"))
    lse = stats[_stat("STAT_STUDENT_LSE")] / spec.temperature  # T lse(s / T)
    atoms = valid_flat & (ids >= 0)
    options = spec.topk
    with torch.enable_grad():
        x_leaf, lse_leaf = x.detach().requires_grad_(True), lse.detach().requires_grad_(True)
        terms = topk_atom_terms(x_leaf, lse_leaf, atoms, teacher.logprobs.reshape(N, K), mode=options.mode,
                                divergence=spec.exact_divergence, beta=spec.beta,
                                logprob_floor=options.logprob_floor, loss_max=options.loss_max, stats=True)
        atom_grad, lam = torch.autograd.grad(terms[0].sum(), (x_leaf, lse_leaf))
    row_valid = valid.reshape(N)
    public = torch.stack([terms[1], terms[2], stats[_stat("STAT_STUDENT_ENTROPY")], terms[3]])
    public = torch.where(row_valid, public, 0.0).to(torch.float32)
    loss = torch.where(row_valid, terms[0].detach(), 0.0).to(torch.float32)
    saved = TopKSaved(local_atoms(ids, shard).contiguous(), x, atom_grad)
    return loss, public, saved, torch.where(row_valid, lam, 0.0)


def topk_forward(student, teacher: TopK, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec,
                 shard=None, merge=None):
    """A top-k teacher: ``student_pass`` then ``topk_atoms``. The stats buffer then holds what the backward
    kernels read: the student's T lse (STAT_STUDENT_LSE) and -Lambda in the sampled multiplier's slot (STAT_AUX),
    so that the "sampled" backward kernel with no sampled token writes the dense part of the gradient,
    p_v Lambda / T (kernels/token_topk.py adds the atoms' own terms). On vocabulary shards (``shard``), ``merge``
    (stats, valid [N], temperature, shard) makes the slice's student statistics the whole vocabulary's
    (wpkl/parallel/shard_topk.py); the backward kernels then run on the slice unchanged."""
    B, T, _ = student.shape
    N = B * T
    valid_bytes = valid.reshape(N).to(torch.int8)
    stats = student_pass(student, valid_bytes, spec)
    if merge is not None:
        merge(stats, valid.reshape(N), spec.temperature, shard)
    loss, public, atoms, lam = topk_atoms(student, stats, teacher, valid, spec, shard)
    stats[_stat("STAT_AUX")] = -lam  # the backward kernel's multiplier slot
    saved = TritonSaved(student, None, valid_bytes, _no_token(N, student.device), stats, divergence_id("sampled"),
                        spec, atoms)
    return loss.view(B, T), public.view(4, B, T), saved


MAX_ATOM_BLOCK = 256  # atoms per fix-up launch (one warp: 8 per thread); wider lists (several teachers' merged
# atoms, a server's top-1000) take several launches over column blocks


def _no_token(N, device):
    return torch.full((N,), -1, dtype=torch.int64, device=device)  # the dense part: no one-hot


def dense_and_atoms(saved: TritonSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sampled backward kernel with no sampled token (the dense coef p_v Lambda / T, Lambda from the stats'
    STAT_AUX), then the atoms' fix-up (``saved.topk``: distinct ids per row) writing coef (A_j + p_j Lambda) / T."""
    TritonPass.backward(saved, coef, out)
    B, T, V = saved.student.shape
    N, K = saved.topk.ids.shape
    if N == 0 or K == 0:
        return out
    coef = coef.reshape(N).to(torch.float32).contiguous()
    for ids, a, x in atom_blocks(saved.topk):
        args = (ids, a, x, saved.stats, coef, saved.valid_bytes, out, N, ids.shape[1], T, V, out.stride(0),
                out.stride(1), 1.0 / saved.spec.temperature)
        launch(kernels().topk_atoms_bwd_kernel, (N,), args, topk_atoms_meta(ids.shape[1]))
    return out


class TritonTopKPass:
    """The Triton pass's contract for a top-k teacher (``teacher`` a ``TopK``)."""

    forward = staticmethod(topk_forward)
    backward = staticmethod(dense_and_atoms)


def topk_atoms_meta(K: int) -> dict:
    """The atoms' fix-up kernel's meta: one block of K (a power of two) per token, one warp."""
    return dict(BLOCK_K=1 << max(0, (K - 1).bit_length()), num_warps=1)


def atom_blocks(atoms: TopKSaved):
    """The fix-up launches' (ids, atom_grad, x), MAX_ATOM_BLOCK atom columns each (distinct ids: the blocks write
    disjoint columns)."""
    K = atoms.ids.shape[1]
    for first in range(0, K, MAX_ATOM_BLOCK):
        cols = slice(first, first + MAX_ATOM_BLOCK)
        yield tuple(t if K <= MAX_ATOM_BLOCK else t[:, cols].contiguous() for t in (atoms.ids, atoms.atom_grad, atoms.x))


def merged_atoms(atoms: list, valids: torch.Tensor, c: torch.Tensor) -> TopKSaved:
    """Several teachers' atoms (``atoms``: their TopKSaved; ``valids`` [K, N] the rows each sees; ``c`` [K, N]
    their coefficients, 0 where unseen) as one list of distinct ids per row holding sum_k c_k A_k
    (``merge_atoms``)."""
    seen = valids[:, :, None]
    ids = torch.cat([torch.where(seen[k], a.ids, -1) for k, a in enumerate(atoms)], dim=1)
    a = torch.cat([torch.where(seen[k], c[k, :, None] * a.atom_grad, 0.0) for k, a in enumerate(atoms)], dim=1)
    x = torch.cat([a.x for a in atoms], dim=1)
    ids, a, x = merge_atoms(ids, a, x)
    return TopKSaved(ids.contiguous(), x.contiguous(), a.contiguous())


def merge_atoms(ids: torch.Tensor, a: torch.Tensor, x: torch.Tensor):
    """Several teachers' atoms [N, M] of each token as a list of distinct ids: an id given several times (by
    several teachers; or repeated within one, which the value checks report) keeps one atom with the sum of the
    copies' ``a``, the others become padding (-1). The copies are made adjacent by a stable sort and summed as a
    difference of float64 prefix sums (deterministic, no atomics, any number of copies). ``x`` (the student's
    value at the id) is the same for every copy."""
    order = ids.argsort(dim=1, stable=True)
    ids, a, x = ids.gather(1, order), a.gather(1, order), x.gather(1, order)
    prefix = a.double().cumsum(1)
    columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(first, columns, 0).cummax(1).values  # each copy's run's first column
    before = torch.where(start > 0, prefix.gather(1, (start - 1).clamp_min(0)), 0.0)
    last = torch.ones_like(first)
    last[:, :-1] = first[:, 1:]
    return torch.where(last, ids, -1), torch.where(last, prefix - before, 0.0).to(a.dtype), x


@dataclass
class TopKMixtureSaved:
    """Several top-k teachers' backward inputs: the student pass's stats and valid rows (any teacher's), and per
    teacher its atoms, Lambda and rows."""

    student: torch.Tensor | None
    valid_bytes: torch.Tensor  # [N] int8: some teacher sees the token
    stats: torch.Tensor  # [NUM_STATS, N] fp32
    atoms: list  # of TopKSaved
    lams: torch.Tensor  # [K, N] fp32
    valids: torch.Tensor  # [K, N] bool
    spec: LossSpec
    teachers: None = None  # (the fused-linear form drops and attaches ``student`` and ``teachers``, as for logits)


class TritonTopKMixturePass:
    @staticmethod
    def forward(student, teachers, valids, spec: LossSpec, shard=None, merge=None):
        """One student pass (on vocabulary shards, ``merge``d as in ``topk_forward``), every teacher's atoms
        gathered at once, then each teacher's atom math."""
        B, T, _ = student.shape
        K = len(teachers)
        valids, valid_bytes, stats = shared_student_pass(student, valids, K, spec)
        if merge is not None:
            merge(stats, valid_bytes != 0, spec.temperature, shard)
        ids = [t.ids.reshape(B * T, t.ids.shape[-1]).to(torch.int64) for t in teachers]
        parts = [topk_atoms(student, stats, t, valid.view(B, T), spec, shard, x)
                 for t, valid, x in zip(teachers, valids, gather_atoms(student, ids, shard), strict=True)]
        loss = torch.stack([p[0] for p in parts]).view(K, B, T)
        public = torch.stack([p[1] for p in parts]).view(K, 4, B, T)
        saved = TopKMixtureSaved(student, valid_bytes, stats, [p[2] for p in parts],
                                 torch.stack([p[3] for p in parts]).to(torch.float32), valids, spec)
        return loss, public, saved

    @staticmethod
    def backward(saved: TopKMixtureSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, _ = saved.student.shape
        K, N = saved.valids.shape
        c = torch.where(saved.valids, coef.reshape(K, N).to(torch.float32), 0.0)
        stats = saved.stats.clone()
        stats[_stat("STAT_AUX")] = -(c * saved.lams).sum(0)  # -sum_k c_k Lambda_k: the dense part's multiplier
        one = TritonSaved(saved.student, None, saved.valid_bytes, _no_token(N, out.device), stats,
                          divergence_id("sampled"), saved.spec, merged_atoms(saved.atoms, saved.valids, c))
        return dense_and_atoms(one, saved.valid_bytes.to(torch.float32).view(B, T), out)
