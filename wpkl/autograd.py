"""The Triton backend: an autograd Function that launches the fused kernels.

``TritonTokenDivergence.apply`` maps [B, T, V] student and teacher logits to the per-token loss L
(differentiable) and the public per-token statistics [4, B, T] (divergence, teacher confidence, student
and teacher entropy). Weighting and reduction happen afterwards on [B, T] vectors (wpkl/api.py), so
autograd hands the backward kernel d loss / d L_i with the weights already folded in.

``forward_launch`` and ``backward_launch`` build each kernel's grid and arguments; the Function and the
ahead-of-time resource report (``python -m wpkl.kernels.report``) both use them, so the report compiles
exactly the specializations the package launches.
"""

from __future__ import annotations

import torch

from .launch import launch_config

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Output allocation in one place (tests swap in NaN-filled buffers to prove the kernels write every element).
new_buffer = torch.empty
new_buffer_like = torch.empty_like


def _kernels():
    # Imported on first use: importing wpkl must neither need Triton nor compile anything.
    from . import kernels

    return kernels


def launch(kernel, grid, args, meta) -> None:
    """Launch a kernel. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) numpy evaluates masked-off
    lanes too (-inf - -inf, exp overflow) and would warn about values the kernel then discards: those warnings
    are silenced here, for wpkl's own launches only."""
    if type(kernel).__name__ == "InterpretedFunction":
        import numpy as np

        with np.errstate(all="ignore"):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def divergence_id(divergence: str, beta: float) -> int:
    """jsd with beta 0 or 1 is exactly forward or reverse KL: run that (cheaper) specialization."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    return _kernels().DIVERGENCE_IDS[divergence]


def _config(student, teacher):
    sizes = [x.element_size() for x in (student, teacher) if x is not None]
    return launch_config(student.shape[-1], max(sizes))


def forward_launch(student, teacher, valid_bytes, tokens, teacher_logprobs, rollout_logprobs, loss, stats, div_id,
                   beta, temperature):
    """(grid, positional args, meta) of the forward kernel: one program per token.

    ``teacher`` may be None ("sampled" with ``teacher_logprobs``); absent optional inputs are passed as
    placeholders the kernel does not read.
    """
    B, T, V = student.shape
    config = _config(student, teacher)
    args = (
        student, student if teacher is None else teacher, valid_bytes, valid_bytes if tokens is None else tokens,
        loss if teacher_logprobs is None else teacher_logprobs, loss if rollout_logprobs is None else rollout_logprobs,
        loss, stats,
        student.stride(0), student.stride(1),
        0 if teacher is None else teacher.stride(0), 0 if teacher is None else teacher.stride(1),
        T, V, B * T,
        1.0 / temperature, float(beta),
    )
    meta = dict(DIVERGENCE=div_id, TEACHER_LOGITS=teacher is not None, HAS_ROLLOUT=rollout_logprobs is not None,
                BLOCK_V=config.block_v, num_warps=config.num_warps)
    return (B * T,), args, meta


def backward_launch(student, teacher, valid_bytes, tokens, grad_loss, stats, grad, div_id, beta, temperature):
    """(grid, positional args, meta) of the backward kernel: one program per (token, vocabulary block)."""
    B, T, V = student.shape
    config = _config(student, teacher)
    teacher_strides = (0, 0) if teacher is None else (teacher.stride(0), teacher.stride(1))
    args = (
        student, student if teacher is None else teacher, valid_bytes, valid_bytes if tokens is None else tokens,
        grad_loss, stats, grad,
        student.stride(0), student.stride(1), *teacher_strides, grad.stride(0), grad.stride(1),
        T, V, B * T,
        1.0 / temperature, float(beta),
    )
    grid = (B * T, -(-V // config.block_v))
    return grid, args, dict(DIVERGENCE=div_id, BLOCK_V=config.block_v, num_warps=config.num_warps)


class TritonTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence: str,
                beta: float, temperature: float, inplace_backward: bool):
        kernels = _kernels()
        B, T, V = student.shape
        N = B * T
        loss = new_buffer(N, dtype=torch.float32, device=student.device)
        stats = new_buffer(kernels.NUM_STATS, N, dtype=torch.float32, device=student.device)
        valid_bytes = valid.reshape(N).to(torch.int8)
        tokens = None if tokens is None else tokens.reshape(N)
        per_token = [None if x is None else x.reshape(N).to(torch.float32).contiguous()
                     for x in (teacher_logprobs, rollout_logprobs)]
        div_id = divergence_id(divergence, beta)
        if N > 0:
            grid, args, meta = forward_launch(student, teacher, valid_bytes, tokens, *per_token, loss, stats, div_id,
                                              beta, temperature)
            launch(kernels.token_divergence_fwd_kernel, grid, args, meta)
        ctx.save_for_backward(student, teacher, valid_bytes, tokens, stats)
        ctx.div_id, ctx.beta, ctx.temperature, ctx.inplace_backward = div_id, float(beta), temperature, inplace_backward
        public = stats[: kernels.NUM_PUBLIC_STATS].clone().view(kernels.NUM_PUBLIC_STATS, B, T)
        ctx.mark_non_differentiable(public)
        return loss.view(B, T), public

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        student, teacher, valid_bytes, tokens, stats = ctx.saved_tensors
        B, T, V = student.shape
        grad = student if ctx.inplace_backward else new_buffer_like(student)
        if B * T > 0:
            grad_loss = grad_loss.reshape(B * T).to(torch.float32).contiguous()
            grid, args, meta = backward_launch(student, teacher, valid_bytes, tokens, grad_loss, stats, grad,
                                               ctx.div_id, ctx.beta, ctx.temperature)
            launch(_kernels().token_divergence_bwd_kernel, grid, args, meta)
        return grad, None, None, None, None, None, None, None, None, None
