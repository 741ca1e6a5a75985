"""One pass over the vocabulary for a block of tokens: the per-token terms, and later the gradient for given
per-token coefficients. Every input form runs through here: materialized logits (wpkl/ops.py,
wpkl/torch_path.py) and each chunk of the fused-linear path (wpkl/fused_linear.py).

Two implementations of the same contract:

    forward(student [B, T, V], teacher [B, T, V_t] | None, valid [B, T], tokens, teacher_logprobs,
            rollout_logprobs, spec)  ->  loss [B, T], stats [4, B, T], saved
    backward(saved, coef [B, T], out [B, T, V])   writes  out = d(sum_i coef_i L_i) / d student  (out's dtype;
                                                  out may be the student logits' own storage)

- ``TritonPass``: the fused kernels (kernels/); ``saved`` holds the per-token statistics the backward kernel
  needs (log-normalizers, divergence), so backward reads the logits once more and never recomputes a forward.
- ``TorchPass``: the reference math (wpkl/reference.py) over chunks of rows; backward recomputes each chunk
  under autograd. ``row_grad=`` asks the forward to also write d L_i / d student (coefficient 1 per row) while
  its chunk is at hand: callers that know the coefficients only later scale rows instead of recomputing.

Loss and stats come back in float32 (float64 from the torch pass for float64 logits). ``stats=False`` lets the
torch pass skip the teacher confidence and the entropies (NaN then); the kernels compute them at no cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .launch import backward_splits, launch_config
from .reference import TopK, TopKOptions, compute_dtype, exact_divergence, token_terms, topk_atom_terms

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Output allocation in one place (tests swap in NaN-filled buffers to prove the kernels write every element).
new_buffer = torch.empty
new_buffer_like = torch.empty_like


@dataclass(frozen=True)
class PassSpec:
    divergence: str
    beta: float
    temperature: float
    stats: bool = True
    topk: TopKOptions | None = None  # a top-k teacher's options (``teacher`` is then a ``TopK``)
    shard: object = None  # the logits are a vocabulary slice (wpkl/tensor_parallel.py: VocabShard); torch pass only


# ----------------------------------------------------------------------------------------------- Triton


def _kernels():
    # Imported on first use: importing wpkl must neither need Triton nor compile anything.
    from . import kernels

    return kernels


def launch(kernel, grid, args, meta) -> None:
    """Launch a kernel. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) numpy evaluates masked-off
    lanes too (-inf - -inf, exp overflow) and would warn about values the kernel then discards: those warnings
    are silenced here, for wpkl's own launches only."""
    if type(kernel).__name__ == "InterpretedFunction":
        import warnings

        import numpy as np

        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice" in masked-off reductions
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


LOG2E = 1.4426950408889634  # the kernels work in base 2: t = x * log2(e) / T

DIVERGENCE_JSD = 2  # kernels.DIVERGENCE_IDS["jsd"], without importing Triton


def divergence_id(divergence: str, beta: float) -> int:
    """The kernels' id of ``exact_divergence`` (jsd with beta 0 or 1 runs the KL specialization)."""
    return _kernels().DIVERGENCE_IDS[exact_divergence(divergence, beta)]


def _config(student, teacher):
    sizes = [x.element_size() for x in (student, teacher) if x is not None]
    return launch_config(student.shape[-1], max(sizes))


def aligned_base(x):
    """(a view of x's storage that starts at the 16-byte boundary at or before x's first element, the shift
    from there to x's first element in elements). The kernels address rows from this base, so that they can
    find every row's first 16-byte boundary; where the storage itself is not 16-byte aligned, (x, 0)."""
    if x.device.type == "meta":
        return x, 0
    misalignment = x.data_ptr() % 16
    shift = misalignment // x.element_size()
    if misalignment == 0 or misalignment % x.element_size() or x.storage_offset() < shift:
        return x, 0
    return x.as_strided((1,), (1,), x.storage_offset() - shift), shift


def co_aligned(row_offsets, other_offsets, leading, vec) -> bool:
    """Whether every row of two [B, T, .] tensors starts at the same offset modulo vec (their element
    shift, then the two leading strides where that dimension has more than one row): then the student's
    16-byte boundaries are the other tensor's too."""
    return all((a - b) % vec == 0 for a, b, n in zip(row_offsets, other_offsets, (2, *leading), strict=True) if n > 1)


def _row_layout(x, shift):
    return (shift, x.stride(0), x.stride(1))


def forward_launch(student, teacher, valid_bytes, tokens, teacher_logprobs, rollout_logprobs, loss, stats, div_id,
                   beta, temperature):
    """(grid, positional args, meta) of the forward kernel: one program per token.

    ``teacher`` may be None ("sampled" with ``teacher_logprobs``); absent optional inputs are passed as
    placeholders the kernel does not read.
    """
    B, T, V = student.shape
    config = _config(student, teacher)
    student_base, student_shift = aligned_base(student)
    teacher_base, teacher_shift = (student_base, 0) if teacher is None else aligned_base(teacher)
    teacher_rows = (0, 0, 0) if teacher is None else _row_layout(teacher, teacher_shift)
    args = (
        student_base, teacher_base, valid_bytes, valid_bytes if tokens is None else tokens,
        loss if teacher_logprobs is None else teacher_logprobs, loss if rollout_logprobs is None else rollout_logprobs,
        loss, stats,
        student_shift, teacher_rows[0],
        student.stride(0), student.stride(1), teacher_rows[1], teacher_rows[2],
        T, V, B * T,
        LOG2E / temperature, 1.0 / temperature, float(beta),
    )
    aligned = teacher is not None and co_aligned(_row_layout(student, student_shift), teacher_rows, (B, T), config.vec)
    meta = dict(DIVERGENCE=div_id, TEACHER_LOGITS=teacher is not None, HAS_ROLLOUT=rollout_logprobs is not None,
                BLOCK_V=config.block_v, VEC=config.vec, ALIGNED=aligned,
                PRECISE_LOG2=div_id == DIVERGENCE_JSD and student.dtype == torch.float32, num_warps=config.num_warps)
    return (B * T,), args, meta


def backward_launch(student, teacher, valid_bytes, tokens, grad_loss, stats, grad, div_id, beta, temperature):
    """(grid, positional args, meta) of the backward kernel: one program per (token, split of the vocabulary)."""
    B, T, V = student.shape
    config = _config(student, teacher)
    student_base, student_shift = aligned_base(student)
    teacher_base, teacher_shift = (student_base, 0) if teacher is None else aligned_base(teacher)
    grad_base, grad_shift = aligned_base(grad)
    student_rows = _row_layout(student, student_shift)
    teacher_rows = (0, 0, 0) if teacher is None else _row_layout(teacher, teacher_shift)
    grad_rows = _row_layout(grad, grad_shift)
    args = (
        student_base, teacher_base, valid_bytes, valid_bytes if tokens is None else tokens,
        grad_loss, stats, grad_base,
        student_shift, teacher_rows[0], grad_rows[0],
        *student_rows[1:], *teacher_rows[1:], *grad_rows[1:],
        T, V, B * T,
        LOG2E / temperature, 1.0 / temperature, float(beta),
    )
    grid = (B * T, backward_splits(B * T, V, config.block_v))
    meta = dict(DIVERGENCE=div_id, BLOCK_V=config.block_v, VEC=config.vec,
                TEACHER_ALIGNED=teacher is not None and co_aligned(student_rows, teacher_rows, (B, T), config.vec),
                GRAD_ALIGNED=co_aligned(student_rows, grad_rows, (B, T), config.vec),
                PRECISE_LOG2=div_id == DIVERGENCE_JSD and student.dtype == torch.float32, num_warps=config.num_warps)
    return grid, args, meta



@dataclass
class TopKSaved:
    """A top-k teacher's backward inputs, [N, K] each (the row terms are in the stats: see ``_topk_forward``)."""

    ids: torch.Tensor  # int64, -1 pads
    x: torch.Tensor  # fp32 s_j / T at the ids
    atom_grad: torch.Tensor  # fp32 A = dF/dx


@dataclass
class TritonSaved:
    student: torch.Tensor
    teacher: torch.Tensor | None
    valid_bytes: torch.Tensor
    tokens: torch.Tensor | None
    stats: torch.Tensor  # [NUM_STATS, N] fp32: everything the backward kernel needs
    div_id: int
    spec: PassSpec
    topk: TopKSaved | None = None


class TritonPass:
    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: PassSpec):
        kernels = _kernels()
        if isinstance(teacher, TopK):
            return _topk_forward(student, teacher, valid, spec)
        B, T, _ = student.shape
        N = B * T
        loss = new_buffer(N, dtype=torch.float32, device=student.device)
        stats = new_buffer(kernels.NUM_STATS, N, dtype=torch.float32, device=student.device)
        valid_bytes = valid.reshape(N).to(torch.int8)
        tokens = None if tokens is None else tokens.reshape(N)
        per_token = [None if x is None else x.reshape(N).to(torch.float32).contiguous()
                     for x in (teacher_logprobs, rollout_logprobs)]
        div_id = divergence_id(spec.divergence, spec.beta)
        if N > 0:
            grid, args, meta = forward_launch(student, teacher, valid_bytes, tokens, *per_token, loss, stats, div_id,
                                              spec.beta, spec.temperature)
            launch(kernels.token_divergence_fwd_kernel, grid, args, meta)
        public = stats[: kernels.NUM_PUBLIC_STATS].view(kernels.NUM_PUBLIC_STATS, B, T)
        saved = TritonSaved(student, teacher, valid_bytes, tokens, stats, div_id, spec)
        return loss.view(B, T), public, saved

    @staticmethod
    def backward(saved: TritonSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, V = saved.student.shape
        N = B * T
        if N > 0:
            coef = coef.reshape(N).to(torch.float32).contiguous()
            tokens = saved.tokens
            if saved.topk is not None:  # the dense part p_v Lambda / T: "sampled" with no sampled token
                tokens = torch.full((N,), -1, dtype=torch.int64, device=coef.device)
            grid, args, meta = backward_launch(saved.student, saved.teacher, saved.valid_bytes, tokens, coef,
                                               saved.stats, out, saved.div_id, saved.spec.beta,
                                               saved.spec.temperature)
            launch(_kernels().token_divergence_bwd_kernel, grid, args, meta)
            if saved.topk is not None:
                _topk_atoms_backward(saved, coef, out)
        return out


def _topk_forward(student, teacher: TopK, valid, spec: PassSpec):
    """A top-k teacher on the kernels: one pass over each student row (the forward kernel as "sampled" without
    teacher logits gives the student's log-normalizer and entropy), then the atom math of the specification
    (wpkl/reference.py ``topk_atom_terms``) on [N, K] tensors under autograd, for the loss, the divergence, the
    statistics and the per-row backward inputs A = dF/dx and Lambda = dF/dlse. No [N, V] tensor is made.

    The stats buffer then holds what the backward kernels read: the student's T lse (STAT_STUDENT_LSE) and
    -Lambda in the divergence slot, so that the "sampled" backward kernel with no sampled token writes the dense
    part of the gradient, p_v Lambda / T (kernels/token_topk.py adds the atoms' own terms)."""
    kernels = _kernels()
    B, T, V = student.shape
    N, K = B * T, teacher.ids.shape[-1]
    loss = new_buffer(N, dtype=torch.float32, device=student.device)
    stats = new_buffer(kernels.NUM_STATS, N, dtype=torch.float32, device=student.device)
    valid_bytes = valid.reshape(N).to(torch.int8)
    ids = teacher.ids.reshape(N, K).to(torch.int64).contiguous()  # the atoms kernel indexes row * K + k
    if N > 0:
        # The kernel's sampled-token slot: any in-range column (its loss is discarded; it reads the unused
        # log q(y) slot from ``loss``, which is overwritten below).
        slot = (ids[:, 0].clamp(0, max(V - 1, 0)).contiguous() if K > 0
                else torch.zeros_like(valid_bytes, dtype=torch.int64))
        grid, args, meta = forward_launch(student, None, valid_bytes, slot, loss, None, loss, stats,
                                          divergence_id("sampled", spec.beta), spec.beta, spec.temperature)
        launch(kernels.token_divergence_fwd_kernel, grid, args, meta)
    valid_flat = valid.reshape(N, 1)
    in_range = (ids >= -1) & (ids < V)
    gathered = student.gather(-1, ids.clamp(0, max(V - 1, 0)).view(B, T, K)).reshape(N, K).to(torch.float32)
    # An id >= V (the value checks report it) gives its row a NaN loss, never a number from another column; ids
    # below -1 are padding, as in the specification (and reported by the checks too).
    x = torch.where(in_range | ~valid_flat, gathered / spec.temperature, float("nan"))
    lse = stats[4] / spec.temperature  # STAT_STUDENT_LSE holds T lse(s / T)
    atoms = valid_flat & (ids >= 0)
    options = spec.topk or TopKOptions()
    divergence, beta = exact_divergence(spec.divergence, spec.beta), spec.beta
    with torch.enable_grad():
        x_leaf, lse_leaf = x.detach().requires_grad_(True), lse.detach().requires_grad_(True)
        terms = topk_atom_terms(x_leaf, lse_leaf, atoms, teacher.logprobs.reshape(N, K), mode=options.mode,
                                divergence=divergence, beta=beta, logprob_floor=options.logprob_floor,
                                loss_max=options.loss_max, stats=True)
        atom_grad, lam = torch.autograd.grad(terms[0].sum(), (x_leaf, lse_leaf))
    row_valid = valid.reshape(N)
    public = torch.stack([terms[1], terms[2], stats[2], terms[3]])
    public = torch.where(row_valid, public, 0.0).to(torch.float32).view(4, B, T)
    loss = torch.where(row_valid, terms[0].detach(), 0.0).to(torch.float32)
    stats[0] = torch.where(row_valid, -lam, 0.0)  # the backward kernel's divergence slot (see above)
    saved = TritonSaved(student, None, valid_bytes, None, stats, divergence_id("sampled", spec.beta), spec,
                        TopKSaved(ids, x, atom_grad))
    return loss.view(B, T), public, saved


def _topk_atoms_backward(saved: TritonSaved, coef: torch.Tensor, out: torch.Tensor) -> None:
    B, T, V = saved.student.shape
    N, K = saved.topk.ids.shape
    if K == 0:
        return
    grid = (N,)
    args = (saved.topk.ids, saved.topk.atom_grad, saved.topk.x, saved.stats, coef, saved.valid_bytes, out,
            N, K, T, V, out.stride(0), out.stride(1), 1.0 / saved.spec.temperature)
    launch(_kernels().topk_atoms_bwd_kernel, grid, args, topk_atoms_meta(K))


def topk_atoms_meta(K: int) -> dict:
    """The atoms' fix-up kernel's meta: one block of K (a power of two) per token, one warp."""
    return dict(BLOCK_K=1 << max(0, (K - 1).bit_length()), num_warps=1)


# ------------------------------------------------------------------------------------------------ torch

# Rows per chunk = CHUNK_ELEMENTS // V: with 2**20 elements a float32 [chunk, V] buffer is 4 MiB. Measured on a
# 2-core CPU at N=2048, V=32000 (fwd+bwd): 2**16 pays per-op overhead (3.6x eager torch), 2**18 1.3x,
# 2**20 and 2**22 0.7x.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(valid: torch.Tensor, vocab: int):
    """Index tuples for the valid (b, t) tokens, at most CHUNK_ELEMENTS // V rows each: ``(b, slice)`` (a view)
    when the rows are consecutive in one sequence, else a pair of index tensors (a gather)."""
    b, t = valid.nonzero(as_tuple=True)  # one host sync: the torch pass is not the fast path
    b_host, t_host = b.tolist(), t.tolist()
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, len(b_host), step):
        stop = min(start + step, len(b_host))
        first, last = start, stop - 1
        if b_host[first] == b_host[last] and t_host[last] - t_host[first] == last - first:
            yield b_host[first], slice(t_host[first], t_host[last] + 1)
        else:
            yield b[start:stop], t[start:stop]


def _select(x: torch.Tensor | None, rows):
    return None if x is None else x[rows]


def _rows(rows, teacher, tokens, teacher_logprobs, rollout_logprobs) -> dict:
    """The per-row inputs of token_terms for the selected rows (``teacher``: logits, a ``TopK`` or None)."""
    topk = isinstance(teacher, TopK)
    return dict(teacher_logits=None if topk else _select(teacher, rows),
                teacher_topk=teacher[rows] if topk else None, tokens=_select(tokens, rows),
                teacher_logprobs=_select(teacher_logprobs, rows), rollout_logprobs=_select(rollout_logprobs, rows))


@dataclass
class TorchSaved:
    student: torch.Tensor
    valid: torch.Tensor
    per_row: tuple  # teacher, tokens, teacher_logprobs, rollout_logprobs
    spec: PassSpec


class TorchPass:
    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: PassSpec,
                row_grad: torch.Tensor | None = None):
        B, T, V = student.shape
        dtype = compute_dtype(*(x for x in (student, teacher) if isinstance(x, torch.Tensor)))
        loss = student.new_zeros((B, T), dtype=dtype)
        stats = student.new_zeros((4, B, T), dtype=dtype)
        if not spec.stats:
            stats[1:] = float("nan")  # not computed: confidence and entropies unknown
        options = dict(divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature, topk=spec.topk,
                       shard=spec.shard)
        per_row = (teacher, tokens, teacher_logprobs, rollout_logprobs)
        for rows in row_chunks(valid, V):
            x = student[rows].detach()
            with torch.enable_grad():
                if row_grad is not None:
                    x.requires_grad_(True)
                terms = token_terms(x, **_rows(rows, *per_row), stats=spec.stats, **options)
                if row_grad is not None:
                    (row_grad[rows],) = torch.autograd.grad(terms.loss.sum(), x)
            loss[rows] = terms.loss.detach()
            stats[0][rows] = terms.divergence
            if spec.stats:
                for k, value in enumerate(terms[2:], start=1):
                    stats[k][rows] = value
        return loss, stats, TorchSaved(student, valid, per_row, spec)

    @staticmethod
    def backward(saved: TorchSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Recomputes each chunk under autograd; rows of masked tokens are zeroed."""
        spec = saved.spec
        options = dict(divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature, topk=spec.topk,
                       shard=spec.shard)
        out[~saved.valid] = 0
        for rows in row_chunks(saved.valid, saved.student.shape[-1]):
            x = saved.student[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                terms = token_terms(x, **_rows(rows, *saved.per_row), stats=False, **options)
                (out[rows],) = torch.autograd.grad(terms.loss, x, coef[rows].to(terms.loss.dtype))
        return out


def pass_for(backend: str, shard=None):
    """The implementation a resolved backend ("triton" or "torch") runs; ``shard``: on a vocabulary slice
    (wpkl/tensor_parallel.py; the torch pass takes it through the spec)."""
    if backend == "triton" and shard is not None:
        from .tensor_parallel import ShardedTritonPass

        return ShardedTritonPass
    return TritonPass if backend == "triton" else TorchPass


# ------------------------------------------------------------------------------------- weights kernel

WEIGHTS_BLOCK = 512
_REDUCTIONS = {"mean": 0, "sum": 1, "seq_mean": 2, "none": 3}
_POSITION_KINDS = {"ExpDecay": 1.0, "PowerDecay": 2.0, "PositionTable": 3.0, "PositionWindow": 4.0}


def encode_weighting(weighting) -> list[float]:
    """A Weighting as plain numbers (what the weights kernel and the custom op's schema take):
    [position kind, a, b, confidence, disagreement, accumulated, eps, normalize, w_max (inf: none)]; kind 0 none, 1 ExpDecay
    (a = half_life), 2 PowerDecay (a = alpha), 3 PositionTable (the values travel as a tensor), 4 PositionWindow
    (a = start, b = end). ``None`` (uniform) encodes as all zeros."""
    if weighting is None:
        return [0.0] * 8 + [math.inf]
    position = weighting.position
    kind = 0.0 if position is None else _POSITION_KINDS[type(position).__name__]
    a = b = 0.0
    if kind == 1.0:
        a = position.half_life
    elif kind == 2.0:
        a = position.alpha
    elif kind == 4.0:
        a, b = position.start, position.end
    w_max = getattr(weighting, "w_max", None)
    return [kind, float(a), float(b), weighting.confidence, weighting.disagreement, weighting.accumulated,
            weighting.accumulated_eps, float(weighting.normalize), math.inf if w_max is None else float(w_max)]


def num_stats() -> int:
    return _kernels().NUM_STATS


@dataclass
class WeightsOutputs:
    out: torch.Tensor  # [1] the loss, or [N] for "none"
    weight: torch.Tensor  # [N]
    position: torch.Tensor  # [N]
    coef: torch.Tensor  # [N] d loss / d L_i
    flags: torch.Tensor  # [NUM_CHECKS] int32


def weights_launch(valid, divergence, confidence, loss, *, weighting: list[float], table, reduction: str,
                   segments: int, row_length: int, vocab: int, user_weights=None, positions=None, tokens=None,
                   teacher_logprobs=None, rollout_logprobs=None, num_items_in_batch=None,
                   logprob_tolerance: float = 1e-3):
    """(grid, args, meta, outputs) of the weights kernel over flat [N] vectors (kernels/token_weights.py).

    ``weighting``: ``encode_weighting``'s list; ``table``: a PositionTable's values on the device (fp32) or None.
    ``segments``: 0 rows of ``row_length`` tokens, 1 packed input split at each position 0, 2 one sequence."""
    N = valid.numel()
    device = valid.device
    f32 = dict(dtype=torch.float32, device=device)
    scratch = new_buffer(4, max(N, 1), **f32)
    segment = new_buffer(max(N, 1), dtype=torch.int32, device=device)
    outputs = WeightsOutputs(out=new_buffer(N if reduction == "none" else 1, **f32), weight=new_buffer(N, **f32),
                             position=new_buffer(N, **f32), coef=new_buffer(N, **f32),
                             flags=new_buffer(8, dtype=torch.int32, device=device))
    kind, pos_a, pos_b, confidence_exp, disagreement_exp, gamma, eps, normalize, w_max = weighting
    kind = int(kind)
    table_len = 1 if table is None else table.numel()
    table = scratch if table is None else table  # a placeholder the kernel does not read
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_mode, num_items_value, num_items_tensor = 2, 0.0, num_items_in_batch.reshape(1)
    elif num_items_in_batch is not None:
        num_items_mode, num_items_value, num_items_tensor = 1, float(num_items_in_batch), scratch
    else:
        num_items_mode, num_items_value, num_items_tensor = 0, 0.0, scratch

    def placeholder(x):
        return scratch if x is None else x.reshape(N)

    args = (
        valid.reshape(N), divergence.reshape(N), confidence.reshape(N), loss.reshape(N),
        placeholder(user_weights), placeholder(positions), placeholder(tokens), placeholder(teacher_logprobs),
        placeholder(rollout_logprobs), table, num_items_tensor,
        outputs.out, outputs.weight, outputs.position, outputs.coef, outputs.flags,
        segment, scratch[0], scratch[1], scratch[2],
        N, max(row_length, 1), vocab, table_len,
        float(pos_a), float(pos_b), float(confidence_exp), float(disagreement_exp), float(gamma),
        float(eps) if eps > 0 else 1.0, num_items_value, float(logprob_tolerance),
        float(w_max) if math.isfinite(w_max) else 0.0,
    )
    meta = dict(
        SEGMENTS=segments, POSITION=kind, POSITIONS_GIVEN=positions is not None,
        HAS_USER=user_weights is not None,
        CONFIDENCE=confidence_exp > 0, DISAGREEMENT=disagreement_exp > 0, ACCUMULATED=gamma > 0,
        W_MAX=math.isfinite(w_max),
        NORMALIZE=bool(normalize),
        REDUCTION=_REDUCTIONS[reduction], NUM_ITEMS=num_items_mode,
        CHECK_TOKENS=tokens is not None, CHECK_TEACHER_LOGPROBS=teacher_logprobs is not None,
        CHECK_ROLLOUT=rollout_logprobs is not None,
        BLOCK=WEIGHTS_BLOCK, num_warps=4,
    )
    return (1,), args, meta, outputs
