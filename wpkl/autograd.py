"""The Triton backend on materialized logits: an autograd Function over the fused kernels.

``TritonTokenDivergence.apply`` maps [B, T, V] student and teacher logits to the per-token loss L
(differentiable) and the public per-token statistics [4, B, T] (divergence, teacher confidence, student
and teacher entropy). Weighting and reduction happen afterwards on [B, T] vectors (wpkl/api.py), so
autograd hands the backward kernel d loss / d L_i with the weights already folded in.

The kernel launches (grid, arguments, specialization) live in wpkl/vocab_pass.py, shared with the
fused-linear path and the ahead-of-time resource report (``python -m wpkl.kernels.report``).
"""

from __future__ import annotations

import torch

from . import vocab_pass
from .checks import run_flags
from .vocab_pass import KERNEL_DTYPES, PassSpec, TritonPass, backward_launch, divergence_id, forward_launch

__all__ = ["KERNEL_DTYPES", "TritonTokenDivergence", "TritonWeightedLoss", "backward_launch", "divergence_id",
           "forward_launch"]


class TritonTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence: str,
                beta: float, temperature: float, inplace_backward: bool):
        loss, public, saved = TritonPass.forward(student, teacher, valid, tokens, teacher_logprobs,
                                                 rollout_logprobs, PassSpec(divergence, float(beta), temperature))
        ctx.save_for_backward(saved.student, saved.teacher, saved.valid_bytes, saved.tokens, saved.stats)
        ctx.saved_pass, ctx.inplace_backward = saved, inplace_backward
        public = public.clone()  # the private rows stay behind for backward
        ctx.mark_non_differentiable(public)
        return loss, public

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        student, teacher, valid_bytes, tokens, stats = ctx.saved_tensors
        saved = ctx.saved_pass
        saved.student, saved.teacher, saved.valid_bytes, saved.tokens, saved.stats = (student, teacher, valid_bytes,
                                                                                     tokens, stats)
        out = student if ctx.inplace_backward else vocab_pass.new_buffer_like(student)
        TritonPass.backward(saved, grad_loss, out)
        return out, None, None, None, None, None, None, None, None, None


class TritonWeightedLoss(torch.autograd.Function):
    """The whole Triton path in two kernels forward and one backward: the vocabulary pass, then the weights kernel
    (weights, reduction, value checks over [N]); backward runs the vocabulary pass's gradient with the
    per-token coefficients d loss / d L_i the weights kernel wrote, times the upstream gradient.

    Returns the loss (a scalar, or [B, T] for reduction "none"), the public stats [4, B, T], the weights and the
    positions [B, T]. Value-check failures are raised through wpkl/checks.py (no host sync on CUDA)."""

    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, user_weights, positions,
                num_items, config):
        B, T, V = student.shape
        spec = PassSpec(config.divergence, float(config.beta), config.temperature)
        loss, public, saved = TritonPass.forward(student, teacher, valid, tokens, teacher_logprobs,
                                                 rollout_logprobs, spec)
        weights = None
        if B * T > 0:
            grid, args, meta, weights = vocab_pass.weights_launch(
                saved.valid_bytes, public[0], public[1], loss, weighting=config.weighting, reduction=config.reduction,
                segments=config.segments, row_length=T, vocab=V, user_weights=user_weights, positions=positions,
                tokens=tokens, teacher_logprobs=teacher_logprobs, rollout_logprobs=rollout_logprobs,
                num_items_in_batch=num_items if num_items is not None else config.num_items_value,
                logprob_tolerance=config.logprob_tolerance)
            vocab_pass.launch(vocab_pass._kernels().token_weights_kernel, grid, args, meta)
            run_flags(weights.flags, config.check_messages)
            out = weights.out.view(B, T) if config.reduction == "none" else weights.out.view(())
            weight, position, coef = (x.view(B, T) for x in (weights.weight, weights.position, weights.coef))
        else:
            zeros = student.new_zeros((B, T), dtype=torch.float32)
            out = zeros if config.reduction == "none" else student.new_zeros((), dtype=torch.float32)
            weight = position = coef = zeros
        ctx.save_for_backward(saved.student, saved.teacher, saved.valid_bytes, saved.tokens, saved.stats, coef)
        ctx.saved_pass, ctx.inplace_backward = saved, config.inplace_backward
        ctx.mark_non_differentiable(public, weight, position)
        return out, public, weight, position

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, *unused):
        student, teacher, valid_bytes, tokens, stats, coef = ctx.saved_tensors
        saved = ctx.saved_pass
        saved.student, saved.teacher, saved.valid_bytes, saved.tokens, saved.stats = (student, teacher, valid_bytes,
                                                                                     tokens, stats)
        out = student if ctx.inplace_backward else vocab_pass.new_buffer_like(student)
        TritonPass.backward(saved, coef * grad_out.to(coef.dtype), out)
        return out, *(None,) * 9
