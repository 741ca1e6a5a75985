"""The fused-linear form: the weighted divergence from hidden states and lm_head weights, never materializing
[N, V] logits.

Per chunk of valid tokens the student (and teacher) logits are projected in float32 (wpkl/projection.py:
TRL's precision convention), handed to the same vocabulary pass the materialized form runs
(wpkl/vocab_pass.py: the Triton kernels or the reference math), and dropped. Weighting and reduction then run
on [B, T] vectors exactly as for materialized logits (wpkl/api.py). The chain rule through the projection:

    d z / d (h W^T + b) = scale * (1 - (z / c)^2)      (z the logits after scale and softcap c; without softcap: scale)
    grad_h = G W,   grad_W = G^T h,   grad_b = sum_rows G,      G = d loss / d (h W^T + b) of the chunk

G is cast to the compute dtype before its two GEMMs and accumulated in float32 (TRL's convention).

Two schedules, chosen per call (``schedule()``):

- **eager** (4 GEMM-equivalents of N V H with a co-located teacher: 2 projections + 2 gradient GEMMs): when every
  token's weight is known once its chunk is done and only one scalar for the whole batch remains (uniform,
  position, confidence, disagreement and token weights; ``accumulated`` when chunks hold whole sequences;
  normalization and the upstream gradient are that scalar), the gradients are computed during the forward pass
  with the per-token coefficients ``w_i * r_i`` (weight times the reduction's d loss / d (w_i L_i)), kept in
  float32, and scaled in backward (as Liger's fused-linear losses do). The scalar is recovered from the
  ``d loss / d L_i`` autograd hands backward (they are that scalar times the coefficients, by construction).
- **two-phase** (6 GEMM-equivalents): otherwise (``reduction="none"``, ``accumulated`` with a sequence longer
  than a chunk). Forward keeps per-token statistics only; backward recomputes both projections chunk by chunk.

Memory beyond the inputs and the returned gradients, per call:

    chunk buffers   chunk_size * (b V + 8 H) bytes      b = 16 with the Triton kernels (student and teacher logits
                                                        fp32, the logits-gradient, its cast to the compute dtype),
                                                        b = 48 with the torch pass (the reference math's
                                                        temporaries); 8 H: the hidden rows and their gradient
    accumulators    4 (V H + N H + V) bytes: grad_W, grad_h, grad_b in float32 (those that are asked for)
    casts           V H * bytes(compute dtype) per weight not already in the compute dtype (once per call)

with ``chunk_size = max(1, CHUNK_BYTES // (b V + 8 H))`` tokens (CHUNK_BYTES = 1 GiB: 441 tokens at
V = 151936, H = 4096 with the kernels) unless given. Valid tokens are compacted first (one host sync: the chunk
loop needs their count); masked tokens cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .projection import accumulate_dtype, addmm_fp32, compute_dtype, matmul_fp32, project
from .vocab_pass import PassSpec, TorchSaved, TritonSaved, pass_for

CHUNK_BYTES = 1 << 30
# Bytes per logit of a chunk (module docstring): measured for the torch pass (peak RSS, tests/test_fused_linear.py).
BYTES_PER_LOGIT = {"triton": 16, "torch": 48}


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
    tokens than a chunk. One host sync (the valid tokens' count decides the loop).
    """
    B, T = valid.shape
    ids = valid.reshape(-1).nonzero().squeeze(1)
    if not whole_rows:
        return [ids[i:i + chunk_size] for i in range(0, ids.numel(), chunk_size)]
    counts = valid.sum(dim=1).tolist()
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


class FusedLinearTokenDivergence(torch.autograd.Function):
    """[N, H] hidden states -> per-token loss L [N] (differentiable in the student's hidden, weight and bias) and
    the public stats [4, N]. ``coefficients`` (eager schedule): a function (chunk ids, loss, stats so far) ->
    each token's d loss / d L_i up to one scalar; None runs the two-phase schedule."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, valid, tokens, teacher_logprobs, rollout_logprobs,
                spec: LinearSpec, chunks, coefficients):
        N, vocab = h_s.shape[0], w_s.shape[0]
        dtype_s = compute_dtype(h_s)
        dtype_t = None if h_t is None else compute_dtype(h_t)
        acc = accumulate_dtype(dtype_s)
        # Weights cast to the compute dtype once per call (a no-op when they already are), the teacher's sliced to V.
        w_s_c = w_s.detach().to(dtype_s)
        w_t_c = None if w_t is None else w_t.detach()[:vocab].to(dtype_t)
        b_t_c = None if b_t is None else b_t.detach()[:vocab]
        passes = pass_for(spec.backend)
        eager = coefficients is not None
        needs = ctx.needs_input_grad
        loss = h_s.new_zeros(N, dtype=acc)
        stats = h_s.new_zeros(4, N, dtype=acc)
        grads = _Grads.new(h_s, w_s, b_s, needs) if eager else None
        coef_all = h_s.new_zeros(N, dtype=acc) if eager else None
        pass_stats = []
        for ids in chunks:
            s = project(h_s[ids].detach(), w_s_c, None if b_s is None else b_s.detach(), spec.student_scale,
                        spec.student_softcap, dtype_s)
            t = None if h_t is None else project(h_t[ids], w_t_c, b_t_c, spec.teacher_scale, spec.teacher_softcap,
                                                 dtype_t)
            per_token = [None if x is None else x[ids][None] for x in (tokens, teacher_logprobs, rollout_logprobs)]
            valid_c = torch.ones(1, ids.numel(), dtype=torch.bool, device=h_s.device)
            row_grad = torch.empty_like(s)[None] if eager and spec.backend == "torch" else None
            extra = {} if spec.backend == "triton" else dict(row_grad=row_grad)
            loss_c, stats_c, saved = passes.forward(s[None], None if t is None else t[None], valid_c, *per_token,
                                                    spec.pass_spec, **extra)
            loss[ids] = loss_c[0].to(acc)
            stats[:, ids] = stats_c[:, 0].to(acc)
            if eager:
                coef = coefficients(ids, loss, stats).to(acc)
                coef_all[ids] = coef
                g = _logits_grad(spec, saved, s, coef, row_grad)
                grads.add(g, s, ids, h_s, w_s_c, spec, dtype_s)
            elif spec.backend == "triton":
                pass_stats.append(saved.stats)
        ctx.spec, ctx.chunks, ctx.eager = spec, chunks, eager
        if eager:
            ctx.grads = grads
            ctx.save_for_backward(coef_all)
        else:
            ctx.pass_stats = pass_stats
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, tokens, teacher_logprobs, rollout_logprobs)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        nones = (None,) * 10
        if ctx.eager:
            (coef,) = ctx.saved_tensors
            g = grad_loss.to(coef.dtype)
            # d loss / d L = scalar * coef exactly (module docstring): the least-squares scalar, no host sync.
            norm = (coef * coef).sum()
            scalar = torch.where(norm > 0, (g * coef).sum() / torch.where(norm > 0, norm, 1.0), 0.0)
            return (*ctx.grads.finish(scalar), *nones)
        h_s, w_s, b_s, h_t, w_t, b_t, tokens, teacher_logprobs, rollout_logprobs = ctx.saved_tensors
        spec = ctx.spec
        vocab = w_s.shape[0]
        dtype_s = compute_dtype(h_s)
        dtype_t = None if h_t is None else compute_dtype(h_t)
        w_s_c = w_s.detach().to(dtype_s)
        w_t_c = None if w_t is None else w_t.detach()[:vocab].to(dtype_t)
        b_t_c = None if b_t is None else b_t.detach()[:vocab]
        grads = _Grads.new(h_s, w_s, b_s, ctx.needs_input_grad)
        grad_loss = grad_loss.to(accumulate_dtype(dtype_s))
        for k, ids in enumerate(ctx.chunks):
            s = project(h_s[ids].detach(), w_s_c, None if b_s is None else b_s.detach(), spec.student_scale,
                        spec.student_softcap, dtype_s)
            t = None if h_t is None else project(h_t[ids], w_t_c, b_t_c, spec.teacher_scale, spec.teacher_softcap,
                                                 dtype_t)
            per_token = [None if x is None else x[ids][None] for x in (tokens, teacher_logprobs, rollout_logprobs)]
            valid_c = torch.ones(1, ids.numel(), dtype=torch.bool, device=h_s.device)
            if spec.backend == "triton":
                chunk_tokens = None if tokens is None else tokens[ids]
                saved = TritonSaved(s[None], None if t is None else t[None], valid_c.reshape(-1).to(torch.int8),
                                    chunk_tokens, ctx.pass_stats[k], _div_id(spec), spec.pass_spec)
            else:
                saved = TorchSaved(s[None], valid_c, (None if t is None else t[None], *per_token), spec.pass_spec)
            g = _logits_grad(spec, saved, s, grad_loss[ids], None)
            grads.add(g, s, ids, h_s, w_s_c, spec, dtype_s)
        return (*grads.finish(None), *nones)


def _div_id(spec: LinearSpec) -> int:
    from .vocab_pass import divergence_id

    return divergence_id(spec.pass_spec.divergence, spec.pass_spec.beta)


def _logits_grad(spec: LinearSpec, saved, s: torch.Tensor, coef: torch.Tensor, row_grad) -> torch.Tensor:
    """d (sum_i coef_i L_i) / d (h W^T + b) for one chunk, [n, V] in the accumulation dtype.

    The logit scale is folded into the per-token coefficient; the softcap's derivative needs the logits, so the
    gradient overwrites them (one buffer) only without a softcap."""
    coef = coef * spec.student_scale
    if row_grad is not None:  # the torch pass wrote d L_i / d z during the forward pass
        out = row_grad[0].mul_(coef.unsqueeze(-1).to(row_grad.dtype))
    else:
        out = s if spec.student_softcap is None else torch.empty_like(s)
        pass_for(spec.backend).backward(saved, coef[None], out[None])
    if spec.student_softcap is not None:
        out.mul_(1.0 - (s / spec.student_softcap) ** 2)
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
        acc = accumulate_dtype(compute_dtype(h_s))

        def zeros(x, need):
            return None if x is None or not need else torch.zeros(x.shape, dtype=acc, device=x.device)

        return cls(h_s, w_s, b_s, zeros(h_s, needs[0]), zeros(w_s, needs[1]), zeros(b_s, needs[2]))

    def add(self, g: torch.Tensor, s: torch.Tensor, ids, h_s, w_s_c, spec: LinearSpec, dtype_s) -> None:
        if self.bias is not None:
            self.bias += g.sum(dim=0, dtype=self.bias.dtype)
        if self.hidden is None and self.weight is None:
            return
        g_c = g.to(dtype_s)  # TRL's convention: the logits-gradient in the compute dtype for both GEMMs
        if self.hidden is not None:
            self.hidden[ids] = matmul_fp32(g_c, w_s_c).to(self.hidden.dtype)
        if self.weight is not None:
            addmm_fp32(self.weight, g_c.t(), h_s[ids].detach().to(dtype_s))

    def finish(self, scalar):
        out = []
        for acc, like in ((self.hidden, self.h_s), (self.weight, self.w_s), (self.bias, self.b_s)):
            if acc is None:
                out.append(None)
                continue
            if scalar is not None:
                acc.mul_(scalar.to(acc.dtype))
            out.append(acc.to(like.dtype))
        return out
