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

from .launch import backward_splits, launch_config

LOG2E = 1.4426950408889634  # the kernels work in base 2: t = x * log2(e) / T

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIVERGENCE_JSD = 2  # kernels.DIVERGENCE_IDS["jsd"], without importing Triton


# Output allocation in one place (tests swap in NaN-filled buffers to prove the kernels write every element).
new_buffer = torch.empty
new_buffer_like = torch.empty_like


def _kernels():
    # Imported on first use: importing wpkl must neither need Triton nor compile anything.
    from . import kernels

    return kernels


def divergence_id(divergence: str, beta: float) -> int:
    """jsd with beta 0 or 1 is exactly forward or reverse KL: run that (cheaper) specialization."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    return _kernels().DIVERGENCE_IDS[divergence]


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


def _rows(x, shift):
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
    teacher_rows = (0, 0, 0) if teacher is None else _rows(teacher, teacher_shift)
    args = (
        student_base, teacher_base, valid_bytes, valid_bytes if tokens is None else tokens,
        loss if teacher_logprobs is None else teacher_logprobs, loss if rollout_logprobs is None else rollout_logprobs,
        loss, stats,
        student_shift, teacher_rows[0],
        student.stride(0), student.stride(1), teacher_rows[1], teacher_rows[2],
        T, V, B * T,
        LOG2E / temperature, 1.0 / temperature, float(beta),
    )
    aligned = teacher is not None and co_aligned(_rows(student, student_shift), teacher_rows, (B, T), config.vec)
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
    student_rows = _rows(student, student_shift)
    teacher_rows = (0, 0, 0) if teacher is None else _rows(teacher, teacher_shift)
    grad_rows = _rows(grad, grad_shift)
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
            kernels.token_divergence_fwd_kernel[grid](*args, **meta)
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
            _kernels().token_divergence_bwd_kernel[grid](*args, **meta)
        return grad, None, None, None, None, None, None, None, None, None
