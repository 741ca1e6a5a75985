"""The Triton pass of several teachers' logits at once (kernels/token_mixture.py): the student row read once for
all K teachers, forward and backward (wpkl.multi_teacher_loss with dense mixing, reverse or forward KL).

    forward(student [B, T, V], teachers [K of [B, T, V_t]], valids [K, B, T], spec) -> loss [K, B, T],
            stats [K, 4, B, T], saved
    backward(saved, coef [K, B, T], out [B, T, V])   writes  out = d(sum_k,i coef_k,i L_k,i) / d student

The kernels find each teacher's rows through a small int64 table (its first element from teacher 0's aligned base,
its two leading strides), made from host numbers and copied to the device without a host synchronization
(pinned memory, non-blocking). Teachers share one dtype (the route checks it).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, replace

import torch

from ..spec import LossSpec
from . import common
from .common import LOG2E, divergence_id, kernels, launch
from .launch import LaunchConfig, backward_splits, launch_config
from .triton_pass import aligned_base, co_aligned

MAX_TEACHERS = 4  # the kernels hold K + 1 vectors of logits per thread: more teachers make groups of 4 (at 8,
# bf16 forward spills on sm_90)


def _rows(x, first):
    return (first, x.stride(0), x.stride(1))


def teacher_table(teachers, device):
    """(teacher 0's aligned base, the [3, KB] int64 table of every teacher's (first element from it, stride_b,
    stride_t), the teachers' row layouts as the host sees them, and whether the base is 16-byte aligned)."""
    base, shift = aligned_base(teachers[0])
    size = teachers[0].element_size()
    rows = [_rows(teachers[0], shift)] + [_rows(t, (t.data_ptr() - base.data_ptr()) // size) for t in teachers[1:]]
    kb = 1 << (len(teachers) - 1).bit_length()
    rows += [rows[0]] * (kb - len(teachers))  # the padding rows: teacher 0's, never read
    flat = array("q", [row[i] for i in range(3) for row in rows])
    table = torch.frombuffer(flat, dtype=torch.int64).clone().view(3, kb)
    if device.type == "cuda":  # pinned: the copy does not wait for the GPU
        table = table.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        table = table.to(device)
    aligned_base_ok = device.type == "meta" or base.data_ptr() % 16 == 0
    return base, table, rows[: len(teachers)], aligned_base_ok


def mixture_config(vocab: int, element_size: int) -> LaunchConfig:
    """The single-teacher launch config with one 16-byte vector per thread per tensor (half its block at large V):
    a thread then holds K + 1 vectors of logits and K rows of partials, and the registers stay those of a
    few programs per SM."""
    config = launch_config(vocab, element_size)
    return replace(config, block_v=min(config.block_v, config.vec * 32 * config.num_warps))


def _config(student, teachers):
    return mixture_config(student.shape[-1], max(student.element_size(), teachers[0].element_size()))


def _aligned(student_rows, teacher_rows, base_ok, leading, vec) -> bool:
    return base_ok and all(co_aligned(student_rows, rows, leading, vec) for rows in teacher_rows)


@dataclass
class MixtureSaved:
    student: torch.Tensor
    teachers: list
    base: torch.Tensor
    table: torch.Tensor
    valid: torch.Tensor  # [K, N] int8
    stats: torch.Tensor  # [K, NUM_STATS, N] fp32
    aligned: bool
    div_id: int
    spec: LossSpec


def forward_launch(student, teachers, valid, loss, stats, div_id, temperature, table=None):
    """(grid, args, meta, (base, table, aligned)) of the forward kernel: one program per token."""
    B, T, V = student.shape
    config = _config(student, teachers)
    student_base, student_shift = aligned_base(student)
    base, table_, teacher_rows, base_ok = teacher_table(teachers, student.device)
    table = table_ if table is None else table
    aligned = _aligned(_rows(student, student_shift), teacher_rows, base_ok, (B, T), config.vec)
    K = len(teachers)
    args = (student_base, base, table, valid, loss, stats, student_shift, student.stride(0), student.stride(1),
            T, V, B * T, K, LOG2E / temperature, 1.0 / temperature)
    meta = dict(DIVERGENCE=div_id, KB=table.shape[1], BLOCK_V=config.block_v, VEC=config.vec, ALIGNED=aligned,
                num_warps=config.num_warps)
    return (B * T,), args, meta, (base, table, aligned)


def backward_launch(student, base, table, aligned, K, valid, grad_loss, stats, grad, div_id, temperature):
    B, T, V = student.shape
    config = mixture_config(V, max(student.element_size(), base.element_size()))
    student_base, student_shift = aligned_base(student)
    grad_base, grad_shift = aligned_base(grad)
    student_rows, grad_rows = _rows(student, student_shift), _rows(grad, grad_shift)
    args = (student_base, base, table, valid, grad_loss, stats, grad_base, student_shift, grad_shift,
            student.stride(0), student.stride(1), grad.stride(0), grad.stride(1), T, V, B * T, K,
            LOG2E / temperature, 1.0 / temperature)
    grid = (B * T, backward_splits(B * T, V, config.block_v))
    meta = dict(DIVERGENCE=div_id, KB=table.shape[1], BLOCK_V=config.block_v, VEC=config.vec,
                TEACHER_ALIGNED=aligned, GRAD_ALIGNED=co_aligned(student_rows, grad_rows, (B, T), config.vec),
                num_warps=config.num_warps)
    return grid, args, meta


class TritonMixturePass:
    @staticmethod
    def forward(student, teachers, valids, spec: LossSpec):
        k = kernels()
        B, T, _ = student.shape
        K, N = len(teachers), B * T
        loss = common.new_buffer(K, N, dtype=torch.float32, device=student.device)
        stats = common.new_buffer(K, k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        valid = valids.reshape(K, N).to(torch.int8)
        div_id = divergence_id(spec.exact_divergence)
        grid, args, meta, (base, table, aligned) = forward_launch(student, teachers, valid, loss, stats, div_id,
                                                                  spec.temperature)
        if N > 0:
            launch(k.token_mixture_fwd_kernel, grid, args, meta)
        public = stats[:, : k.NUM_PUBLIC_STATS].view(K, k.NUM_PUBLIC_STATS, B, T)
        saved = MixtureSaved(student, list(teachers), base, table, valid, stats, aligned, div_id, spec)
        return loss.view(K, B, T), public, saved

    @staticmethod
    def backward(saved: MixtureSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, V = saved.student.shape
        K, N = len(saved.teachers), B * T
        if N > 0:
            coef = coef.reshape(K, N).to(torch.float32).contiguous()
            grid, args, meta = backward_launch(saved.student, saved.base, saved.table, saved.aligned, K, saved.valid,
                                               coef, saved.stats, out, saved.div_id, saved.spec.temperature)
            launch(kernels().token_mixture_bwd_kernel, grid, args, meta)
        return out
