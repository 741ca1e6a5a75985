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
from .vocab_pass import KERNEL_DTYPES, PassSpec, TritonPass, backward_launch, divergence_id, forward_launch

__all__ = ["KERNEL_DTYPES", "TritonTokenDivergence", "backward_launch", "divergence_id", "forward_launch"]


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
