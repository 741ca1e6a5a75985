"""The Triton vocabulary pass: the fused kernels (kernels/) for a [B, T, V] block of logits.

    forward(student [B, T, V], teacher [B, T, V_t] | None, valid [B, T], tokens, teacher_logprobs,
            rollout_logprobs, spec, shard)  ->  loss [B, T], stats [4, B, T], saved
    backward(saved, coef [B, T], out [B, T, V])   writes  out = d(sum_i coef_i L_i) / d student  (out's dtype;
                                                  out may be the student logits' own storage)

``saved`` holds the per-token statistics the backward kernel needs (log-normalizers, divergence), so backward
reads the logits once more and never recomputes a forward. Loss and stats come back in float32. A top-k teacher
(``teacher`` a ``TopK``) runs triton_topk.py's forward on the same kernels. The torch pass (torch_pass.py) keeps
the same contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import LossSpec
from . import common
from .common import DIVERGENCE_JSD, LOG2E, divergence_id, kernels, launch
from .launch import backward_splits, launch_config

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
                   beta, temperature, power=None):
    """(grid, positional args, meta) of the forward kernel: one program per token.

    ``teacher`` may be None ("sampled" with ``teacher_logprobs``); absent optional inputs are passed as
    placeholders the kernel does not read. ``power``: "sampled"'s PowerOPD exponent (``sampled_power``) or None.
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
        LOG2E / temperature, 1.0 / temperature, float(beta), 0.0 if power is None else float(power),
    )
    aligned = teacher is not None and co_aligned(_row_layout(student, student_shift), teacher_rows, (B, T), config.vec)
    meta = dict(DIVERGENCE=div_id, TEACHER_LOGITS=teacher is not None, HAS_ROLLOUT=rollout_logprobs is not None,
                POWER=power is not None,
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


def jsd_partials(student, teacher, valid_bytes, stats, spec: LossSpec) -> torch.Tensor:
    """jsd's second pass on a vocabulary slice with the whole vocabulary's normalizers (``stats``: its lse_s,
    lse_u and lse_gap rows; kernels/token_divergence_fwd.py: token_jsd_partials_kernel): the slice's sums
    [4, N] fp32, sum p log2(m / p), sum q log2(m / q), sum p and sum q (wpkl/parallel/merge.py adds them up)."""
    B, T, _ = student.shape
    partials = common.new_buffer(4, B * T, dtype=torch.float32, device=student.device)
    if B * T > 0:
        grid, args, meta = jsd_partials_launch(student, teacher, valid_bytes, stats, partials, spec.beta,
                                               spec.temperature)
        launch(kernels().token_jsd_partials_kernel, grid, args, meta)
    return partials


def jsd_partials_launch(student, teacher, valid_bytes, stats, partials, beta, temperature):
    """(grid, positional args, meta) of ``jsd_partials``'s kernel: one program per token."""
    B, T, V = student.shape
    config = _config(student, teacher)
    student_base, student_shift = aligned_base(student)
    teacher_base, teacher_shift = aligned_base(teacher)
    student_rows, teacher_rows = _row_layout(student, student_shift), _row_layout(teacher, teacher_shift)
    args = (student_base, teacher_base, valid_bytes, stats, partials, student_shift, teacher_shift,
            *student_rows[1:], *teacher_rows[1:], T, V, B * T, LOG2E / temperature, float(beta))
    meta = dict(BLOCK_V=config.block_v, VEC=config.vec, ALIGNED=co_aligned(student_rows, teacher_rows, (B, T),
                                                                           config.vec),
                PRECISE_LOG2=student.dtype == torch.float32, num_warps=config.num_warps)
    return (B * T,), args, meta


@dataclass
class TritonSaved:
    """What backward needs. ``student``/``teacher`` may be dropped after forward and attached again (the fused-linear
    form recomputes its logits chunk by chunk: ``dataclasses.replace(saved, student=..., teacher=...)``)."""

    student: torch.Tensor | None
    teacher: torch.Tensor | None
    valid_bytes: torch.Tensor
    tokens: torch.Tensor | None  # the kernels' column of the sampled token (-1: none on this slice)
    stats: torch.Tensor  # [NUM_STATS, N] fp32: everything the backward kernel needs
    div_id: int
    spec: LossSpec
    topk: object = None  # a top-k teacher's backward inputs (triton_topk.py: TopKSaved)


class TritonPass:
    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec, shard=None):
        """``teacher``: logits or None ("sampled" with ``teacher_logprobs``). ``shard``: unused (the logits are a
        slice only for wpkl/parallel/merge.py's pass, which hands this one local token columns)."""
        k = kernels()
        B, T, _ = student.shape
        N = B * T
        loss = common.new_buffer(N, dtype=torch.float32, device=student.device)
        stats = common.new_buffer(k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        valid_bytes = valid.reshape(N).to(torch.int8)
        tokens = None if tokens is None else tokens.reshape(N)
        per_token = [None if x is None else x.reshape(N).to(torch.float32).contiguous()
                     for x in (teacher_logprobs, rollout_logprobs)]
        div_id = divergence_id(spec.exact_divergence)
        if N > 0:
            grid, args, meta = forward_launch(student, teacher, valid_bytes, tokens, *per_token, loss, stats, div_id,
                                              spec.beta, spec.temperature, spec.sampled_power)
            launch(k.token_divergence_fwd_kernel, grid, args, meta)
        public = stats[: k.NUM_PUBLIC_STATS].view(k.NUM_PUBLIC_STATS, B, T)
        saved = TritonSaved(student, teacher, valid_bytes, tokens, stats, div_id, spec)
        return loss.view(B, T), public, saved

    @staticmethod
    def backward(saved: TritonSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, V = saved.student.shape
        N = B * T
        if N > 0:
            coef = coef.reshape(N).to(torch.float32).contiguous()
            grid, args, meta = backward_launch(saved.student, saved.teacher, saved.valid_bytes, saved.tokens, coef,
                                               saved.stats, out, saved.div_id, saved.spec.beta,
                                               saved.spec.temperature)
            launch(kernels().token_divergence_bwd_kernel, grid, args, meta)
        return out
