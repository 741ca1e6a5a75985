"""The fused-linear form: the weighted divergence from hidden states and lm_head weights, never materializing
[N, V] logits (no tensor has more than ``chunk_size`` rows of V).

Per chunk of valid tokens the student (and teacher) logits are projected in float32 (wpkl/projection.py:
TRL's precision convention), handed to the same vocabulary pass the materialized form runs
(wpkl/vocab_pass.py: the Triton kernels or the reference math), and dropped. Weighting and reduction then run
on [B, T] vectors exactly as for materialized logits (wpkl/api.py). The chain rule through the projection:

    d z / d (h W^T + b) = scale * (1 - (z / c)^2)      (z the logits after scale and softcap c; without softcap: scale)
    grad_h = G W,   grad_W = G^T h,   grad_b = sum_rows G,      G = d loss / d (h W^T + b) of the chunk

G is cast to the compute dtype before its two GEMMs and accumulated in float32 (TRL's convention). The compute
dtypes are the forward's (the autocast dtype under autocast), saved for backward.

Two schedules, chosen per call (wpkl/api.py: ``fused_linear_kl_loss``):

- **eager** (4 GEMM-equivalents of N V H with a co-located teacher: 2 projections + 2 gradient GEMMs): when every
  token's weight is known once its chunk is done and only one scalar for the whole batch remains (uniform,
  position, confidence, disagreement and token weights; ``accumulated`` when chunks hold whole sequences;
  normalization and the upstream gradient are that scalar), the gradients are computed during the forward pass
  with the per-token coefficients ``w_i * r_i`` (weight times the reduction's d loss / d (w_i L_i)), kept in
  float32, and scaled in backward (as Liger's fused-linear losses do). The scalar is recovered from the
  ``d loss / d L_i`` autograd hands backward (that scalar times the coefficients, by construction). Costs: the
  float32 accumulators are held from forward to backward, and the gradient GEMMs run even if backward never
  does (a grad-enabled evaluation): compute such losses under ``torch.no_grad()``.
- **two-phase** (6 GEMM-equivalents): otherwise: ``reduction="none"``, ``accumulated`` with a sequence longer
  than a chunk, and float16 compute (the logits-gradient is cast to the compute dtype before its GEMMs, and in
  float16 only the two-phase schedule sees the upstream gradient, e.g. GradScaler's loss scale, before that
  cast). Forward keeps per-token statistics only; backward recomputes both projections chunk by chunk (inside
  ``gathered_weights``'s context when one is set, for DeepSpeed ZeRO-3).

Memory beyond the inputs and the returned gradients, per call:

    chunk buffers   chunk_size * (b V + 8 H) bytes      b = 16 with the Triton kernels (student and teacher logits
                                                        fp32, the logits-gradient, its cast to the compute dtype),
                                                        b = 48 with the torch pass (the reference math's
                                                        temporaries); 8 H: the hidden rows and their gradient
    accumulators    4 (V H + N H + V) bytes: grad_W, grad_h, grad_b in float32 (those that are asked for)
    casts           V H * bytes(compute dtype) per weight not already in the compute dtype (once per pass: the
                    two-phase schedule casts again in backward)

with ``chunk_size = max(1, CHUNK_BYTES // (b V + 8 H))`` tokens unless given (CHUNK_BYTES = 2 GiB: 871 tokens at
V = 151936, H = 4096 with the kernels; 3942 at V = 32000). Larger chunks amortize the float32 grad_W
read-modify-write every chunk makes (docs/design.md has the cost model). Valid tokens are compacted first: one
host sync (the chunk loop needs their count; with ``accumulated``, each sequence's too, in the same sync).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from .projection import accumulate_dtype, addmm_fp32, matmul_fp32, project, projection_dtype
from .reference import TopK
from .vocab_pass import PassSpec, TorchSaved, TritonSaved, divergence_id, pass_for

CHUNK_BYTES = 2 << 30
# Bytes per logit of a chunk (module docstring): measured for the torch pass (peak RSS, tests/test_fused_linear.py).
BYTES_PER_LOGIT = {"triton": 16, "torch": 48}

# A factory of the context that makes the lm_head weights readable (DeepSpeed ZeRO-3's gather), set by
# ``gathered_weights``: the two-phase schedule re-enters it in backward, where it reads the weights again.
_weights_context: contextvars.ContextVar = contextvars.ContextVar("wpkl_weights_context", default=None)


@contextlib.contextmanager
def gathered_weights(factory):
    """Run fused-linear calls with ``factory()`` entered (e.g. TRL's ``maybe_gather_lm_head_ctx``); backward
    re-enters a fresh ``factory()`` when it recomputes the projections."""
    token = _weights_context.set(factory)
    try:
        with factory():
            yield
    finally:
        _weights_context.reset(token)


def chunk_bytes(chunk_size: int, vocab: int, hidden: int, backend: str) -> int:
    """The chunk buffers' bytes (module docstring)."""
    return chunk_size * (BYTES_PER_LOGIT[backend] * vocab + 8 * hidden)


def chunk_size_for(vocab: int, hidden: int, backend: str, budget: int | None = None) -> int:
    """Tokens per chunk from the memory budget (module docstring)."""
    return max(1, (CHUNK_BYTES if budget is None else budget) // chunk_bytes(1, vocab, hidden, backend))


@dataclass(frozen=True)
class LinearSpec:
    pass_spec: PassSpec
    backend: str  # "triton" or "torch"
    student_scale: float
    student_softcap: float | None
    teacher_scale: float
    teacher_softcap: float | None


def plan_chunks(valid: torch.Tensor, chunk_size: int, whole_rows: bool):
    """Chunks of the valid tokens of a [B, T] mask, as index tensors into the flattened [B * T] tokens.

    ``whole_rows``: every chunk holds whole sequences (rows); returns None when one sequence has more valid
    tokens than a chunk. One host sync (the valid tokens' count, and each row's, decide the loop).
    """
    B, T = valid.shape
    # The valid tokens first, in order (a stable sort: no data-dependent shape), then one transfer of the counts.
    order = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)
    counts = valid.sum(dim=1)
    n_valid, *counts = torch.cat([counts.sum().reshape(1), counts]).tolist()  # the host sync
    ids = order[:n_valid]
    if not whole_rows:
        return [ids[i:i + chunk_size] for i in range(0, n_valid, chunk_size)]
    if max(counts, default=0) > chunk_size:
        return None
    chunks, start, size = [], 0, 0
    for count in counts:
        if size + count > chunk_size:
            chunks.append(ids[start:start + size])
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(ids[start:start + size])
    return chunks


class _Projector:
    """The per-chunk projections of both models, with the weights cast once per pass to the compute dtypes."""

    def __init__(self, spec: LinearSpec, dtypes, h_s, w_s, b_s, h_t, w_t, b_t):
        self.spec, (self.dtype_s, self.dtype_t) = spec, dtypes
        vocab = w_s.shape[0]
        self.h_s, self.b_s = h_s.detach(), None if b_s is None else b_s.detach()
        self.w_s = w_s.detach().to(self.dtype_s)  # a no-op when the weight is in the compute dtype
        self.h_t = h_t
        self.w_t = None if w_t is None else w_t.detach()[:vocab].to(self.dtype_t)
        self.b_t = None if b_t is None else b_t.detach()[:vocab]

    def __call__(self, ids):
        spec = self.spec
        s = project(self.h_s[ids], self.w_s, self.b_s, spec.student_scale, spec.student_softcap, self.dtype_s)
        t = None if self.h_t is None else project(self.h_t[ids], self.w_t, self.b_t, spec.teacher_scale,
                                                  spec.teacher_softcap, self.dtype_t)
        return s, t


class FusedLinearTokenDivergence(torch.autograd.Function):
    """[N, H] hidden states -> per-token loss L [N] (differentiable in the student's hidden, weight and bias) and
    the public stats [4, N]. ``coefficients`` (eager schedule): a function (chunk ids, loss, stats so far) ->
    each token's d loss / d L_i up to one scalar; None runs the two-phase schedule."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, valid, tokens, teacher_logprobs, rollout_logprobs, topk_ids,
                topk_logprobs, spec: LinearSpec, chunks, coefficients):
        dtypes = (projection_dtype(h_s), None if h_t is None else projection_dtype(h_t))
        # The projections choose their precision themselves (wpkl/projection.py): autocast would round the
        # "float32" logits to its dtype in the forward and not in a backward that runs outside it.
        with torch.autocast(h_s.device.type, enabled=False):
            return FusedLinearTokenDivergence._forward(ctx, dtypes, h_s, w_s, b_s, h_t, w_t, b_t, valid, tokens,
                                                       teacher_logprobs, rollout_logprobs, topk_ids, topk_logprobs,
                                                       spec, chunks, coefficients)

    @staticmethod
    def _forward(ctx, dtypes, h_s, w_s, b_s, h_t, w_t, b_t, valid, tokens, teacher_logprobs, rollout_logprobs,
                 topk_ids, topk_logprobs, spec: LinearSpec, chunks, coefficients):
        N = h_s.shape[0]
        acc = accumulate_dtype(dtypes[0])
        projector = _Projector(spec, dtypes, h_s, w_s, b_s, h_t, w_t, b_t)
        passes = pass_for(spec.backend, spec.pass_spec.shard)
        eager = coefficients is not None
        loss = h_s.new_zeros(N, dtype=acc)
        stats = h_s.new_zeros(4, N, dtype=acc)
        grads = _Grads.new(h_s, w_s, b_s, ctx.needs_input_grad) if eager else None
        coef_all = h_s.new_zeros(N, dtype=acc) if eager else None
        pass_stats = []
        for ids in chunks:
            s, t = projector(ids)
            per_token = _per_token(ids, tokens, teacher_logprobs, rollout_logprobs)
            valid_c = torch.ones(1, ids.numel(), dtype=torch.bool, device=h_s.device)
            row_grad = torch.empty_like(s)[None] if eager and spec.backend == "torch" else None
            extra = {} if spec.backend == "triton" else dict(row_grad=row_grad)
            loss_c, stats_c, saved = passes.forward(s[None], _teacher(t, ids, topk_ids, topk_logprobs), valid_c,
                                                    *per_token, spec.pass_spec, **extra)
            loss[ids] = loss_c[0].to(acc)
            stats[:, ids] = stats_c[:, 0].to(acc)
            if eager:
                coef = coefficients(ids, loss, stats).to(acc)
                coef_all[ids] = coef
                grads.add(_logits_grad(spec, saved, s, coef, row_grad), ids, projector)
            elif spec.backend == "triton":
                pass_stats.append((saved.stats, saved.topk))
            del s, t, saved
        ctx.spec, ctx.chunks, ctx.eager, ctx.dtypes = spec, chunks, eager, dtypes
        ctx.weights_context = _weights_context.get()
        if eager:
            ctx.grads = grads
            ctx.save_for_backward(coef_all)
        else:
            ctx.pass_stats = pass_stats
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, tokens, teacher_logprobs, rollout_logprobs, topk_ids,
                                  topk_logprobs)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        nones = (None,) * 12
        if ctx.eager:
            (coef,) = ctx.saved_tensors
            return (*ctx.grads.finish(_common_scalar(grad_loss, coef), ctx.spec.pass_spec.shard), *nones)
        (h_s, w_s, b_s, h_t, w_t, b_t, tokens, teacher_logprobs, rollout_logprobs, topk_ids,
         topk_logprobs) = ctx.saved_tensors
        spec = ctx.spec
        grads = _Grads.new(h_s, w_s, b_s, ctx.needs_input_grad)
        grad_loss = grad_loss.to(accumulate_dtype(ctx.dtypes[0]))
        gather = contextlib.nullcontext() if ctx.weights_context is None else ctx.weights_context()
        with gather, torch.autocast(h_s.device.type, enabled=False):
            # The forward's compute dtypes (autocast is usually off by now).
            projector = _Projector(spec, ctx.dtypes, h_s, w_s, b_s, h_t, w_t, b_t)
            for k, ids in enumerate(ctx.chunks):
                s, t = projector(ids)
                per_token = _per_token(ids, tokens, teacher_logprobs, rollout_logprobs)
                valid_c = torch.ones(1, ids.numel(), dtype=torch.bool, device=h_s.device)
                if spec.backend == "triton":
                    stats_k, topk_k = ctx.pass_stats[k]
                    tokens_c = None if tokens is None else tokens[ids]
                    if spec.pass_spec.shard is not None:  # the kernels take this slice's columns
                        from .tensor_parallel import local_tokens

                        tokens_c = local_tokens(tokens_c, spec.pass_spec.shard)
                    div_id = divergence_id("sampled" if topk_k is not None else spec.pass_spec.divergence,
                                           spec.pass_spec.beta)
                    saved = TritonSaved(s[None], None if t is None else t[None], valid_c.reshape(-1).to(torch.int8),
                                        tokens_c, stats_k, div_id, spec.pass_spec, topk_k)
                else:
                    saved = TorchSaved(s[None], valid_c, (_teacher(t, ids, topk_ids, topk_logprobs), *per_token),
                                       spec.pass_spec)
                grads.add(_logits_grad(spec, saved, s, grad_loss[ids], None), ids, projector)
                del s, t, saved
        return (*grads.finish(None, spec.pass_spec.shard), *nones)


def _teacher(t, ids, topk_ids, topk_logprobs):
    """The chunk's teacher for the vocabulary pass: its logits [1, n, V], a top-k teacher's atoms, or None."""
    if t is not None:
        return t[None]
    if topk_ids is not None:
        return TopK(topk_ids[ids][None], topk_logprobs[ids][None])
    return None


def _per_token(ids, *tensors):
    return [None if x is None else x[ids][None] for x in tensors]


def _common_scalar(grad_loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The scalar with d loss / d L = scalar * coef (eager schedule), without a host sync.

    Least squares over the tokens whose coefficient and upstream are finite, in float64 and relative to the
    largest |coef| (so that neither tiny nor huge weights underflow or overflow). A NaN coefficient leaves its
    own rows NaN (they were computed with it) and does not spoil the others'."""
    c, g = coef.double(), grad_loss.double()
    finite = torch.isfinite(c) & torch.isfinite(g)
    c, g = torch.where(finite, c, 0.0), torch.where(finite, g, 0.0)
    top = c.abs().max() if c.numel() else c.new_zeros(())
    top = torch.where(top > 0, top, 1.0)
    c = c / top
    norm = (c * c).sum()
    return torch.where(norm > 0, (g * c).sum() / torch.where(norm > 0, norm, 1.0), 0.0) / top


def _logits_grad(spec: LinearSpec, saved, s: torch.Tensor, coef: torch.Tensor, row_grad) -> torch.Tensor:
    """d (sum_i coef_i L_i) / d (h W^T + b) for one chunk, [n, V] in the accumulation dtype.

    The logit scale is folded into the per-token coefficient; the softcap's derivative needs the logits, so the
    gradient overwrites them (one buffer) only without a softcap."""
    coef = coef * spec.student_scale
    if row_grad is not None:  # the torch pass wrote d L_i / d z during the forward pass
        out = row_grad[0].mul_(coef.unsqueeze(-1).to(row_grad.dtype))
    else:
        out = s if spec.student_softcap is None else torch.empty_like(s)
        pass_for(spec.backend, spec.pass_spec.shard).backward(saved, coef[None], out[None])
    if spec.student_softcap is not None:
        # d softcap / d x = 1 - (z / c)^2, computed in place in the logits' buffer (no longer needed).
        out.mul_(s.div_(spec.student_softcap).square_().neg_().add_(1.0))
    return out


@dataclass
class _Grads:
    """Gradient accumulators for the student's hidden states, weight and bias (float32, or float64)."""

    h_s: torch.Tensor
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def new(cls, h_s, w_s, b_s, needs):
        acc = accumulate_dtype(projection_dtype(h_s))

        def zeros(x, need):
            return None if x is None or not need else torch.zeros(x.shape, dtype=acc, device=x.device)

        return cls(h_s, w_s, b_s, zeros(h_s, needs[0]), zeros(w_s, needs[1]), zeros(b_s, needs[2]))

    def add(self, g: torch.Tensor, ids, projector: _Projector) -> None:
        if self.bias is not None:
            self.bias += g.sum(dim=0, dtype=self.bias.dtype)
        if self.hidden is None and self.weight is None:
            return
        g_c = g.to(projector.dtype_s)  # TRL's convention: the logits-gradient in the compute dtype for both GEMMs
        if self.hidden is not None:
            self.hidden[ids] = matmul_fp32(g_c, projector.w_s).to(self.hidden.dtype)
        if self.weight is not None:
            addmm_fp32(self.weight, g_c.t(), projector.h_s[ids].to(projector.dtype_s))

    def finish(self, scalar, shard=None):
        """The gradients in the parameters' dtypes, times ``scalar`` (eager schedule). Out of place: a second
        backward (retain_graph=True) scales the same accumulators again.

        ``shard`` (vocabulary-parallel, wpkl/tensor_parallel.py): the weight and bias gradients are this rank's
        rows; the hidden states' is this rank's part of a sum over the group, all-reduced here (in float32, one
        [N, H] all-reduce per backward: Megatron's column-parallel output layer makes the same one)."""
        out = []
        for acc, like in ((self.hidden, self.h_s), (self.weight, self.w_s), (self.bias, self.b_s)):
            if acc is None:
                out.append(None)
                continue
            grad = acc if scalar is None else acc * scalar.to(acc.dtype)  # two-phase: fresh accumulators
            if shard is not None and acc is self.hidden:
                shard.sum_(grad)
            out.append(grad.to(like.dtype))
        return out
