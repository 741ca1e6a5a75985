"""The Triton pass of several teachers' logits at once (kernels/token_mixture.py): the student row read once for
all K teachers, forward and backward (wpkl.multi_teacher_loss with dense mixing, reverse or forward KL or jsd).

    forward(student [B, T, V], teachers [K of [B, T, V_t]], valids [K, B, T], spec) -> loss [K, B, T],
            stats [K, 4, B, T], saved
    backward(saved, coef [K, B, T], out [B, T, V])   writes  out = d(sum_k,i coef_k,i L_k,i) / d student

Each teacher is passed as its own pointer (its 16-byte aligned base), element shift and two leading strides, in
four slots (MAX_TEACHERS): nothing is copied from the host, and ``saved`` may drop its logits after forward and
attach others (the fused-linear form recomputes them chunk by chunk). Teachers share one dtype and lie whole
elements apart (the route groups them by both: ``element_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..spec import LossSpec
from . import common
from .common import LOG2E, divergence_id, kernels, launch
from .launch import LaunchConfig, backward_splits, launch_config
from .triton_pass import aligned_base, co_aligned

MAX_TEACHERS = 4  # the kernels' teacher slots: a thread holds K + 1 vectors of logits (at 8, the bf16 forward
# spills on sm_90); more teachers make groups of four
MAX_JSD_TEACHERS = 2  # jsd's: its second pass holds each teacher's log-normalizers and four sums, and at four
# teachers the bf16 forward takes 181 registers (one CTA of 8 warps per SM on sm_90); at two, 105 (two CTAs)


def max_teachers(spec: LossSpec) -> int:
    """The teachers one pass takes under the spec's divergence."""
    return MAX_JSD_TEACHERS if spec.exact_divergence == "jsd" else MAX_TEACHERS


def _rows(x, first):
    return (first, x.stride(0), x.stride(1))


def element_grid(teacher) -> int:
    """Where the teacher's aligned base lies within an element (its address modulo the element size): the kernels
    address every teacher from teacher 0's pointer, so the teachers of one pass share it, lying whole elements
    apart (not so for a storage that starts between two elements, a byte offset of ``torch.frombuffer``)."""
    return 0 if teacher.device.type == "meta" else aligned_base(teacher)[0].data_ptr() % teacher.element_size()


def teacher_args(teachers):
    """(the four slots' pointers, their (shift, stride_b, stride_t) rows, whether every base is 16-byte aligned):
    unused slots repeat teacher 0."""
    bases = [aligned_base(t) for t in teachers]
    rows = [_rows(t, shift) for t, (_, shift) in zip(teachers, bases, strict=True)]
    base_ok = all(t.device.type == "meta" or base.data_ptr() % 16 == 0 for t, (base, _) in zip(teachers, bases,
                                                                                                strict=True))
    pad = MAX_TEACHERS - len(teachers)
    return [b for b, _ in bases] + [bases[0][0]] * pad, rows + [rows[0]] * pad, base_ok


def mixture_config(vocab: int, element_size: int) -> LaunchConfig:
    """The single-teacher launch config with one 16-byte vector per thread per tensor (half its block at large V):
    a thread then holds K + 1 vectors of logits and K rows of partials, and the registers stay those of a
    few programs per SM."""
    config = launch_config(vocab, element_size)
    return replace(config, block_v=min(config.block_v, config.vec * 32 * config.num_warps))


def _config(student, teachers):
    return mixture_config(student.shape[-1], max(student.element_size(), teachers[0].element_size()))


def _slots(teachers) -> int:
    return 1 << (len(teachers) - 1).bit_length()  # K rounded up to a power of two


def _aligned(student_rows, teacher_rows, base_ok, leading, vec) -> bool:
    return base_ok and all(co_aligned(student_rows, rows, leading, vec) for rows in teacher_rows)


@dataclass
class MixtureSaved:
    """What backward needs; ``student``/``teachers`` may be dropped after forward and attached again."""

    student: torch.Tensor | None
    teachers: list | None
    valid: torch.Tensor  # [K, N] int8
    stats: torch.Tensor  # [K, NUM_STATS, N] fp32
    div_id: int
    spec: LossSpec
    rows: torch.Tensor | None = None  # [N] int8: the student's terms in teacher 0's slot there too (None: its own)


def _located(student, teachers, vec):
    """(student base, shift, the teachers' kernel arguments, whether every teacher's 16-byte boundaries are the
    student's)."""
    B, T, _ = student.shape
    student_base, student_shift = aligned_base(student)
    pointers, rows, base_ok = teacher_args(teachers)
    aligned = _aligned(_rows(student, student_shift), rows[: len(teachers)], base_ok, (B, T), vec)
    columns = [row[i] for i in range(3) for row in rows]  # the shifts, then the stride_b, then the stride_t
    return student_base, student_shift, pointers, columns, aligned


def _precise_log2(student, div_id) -> bool:
    """jsd with an fp32 student takes the mixture's precise log2 (kernels/common.py: mixture_log2_ratios)."""
    return div_id == common.DIVERGENCE_JSD and student.dtype == torch.float32


def forward_launch(student, teachers, valid, loss, stats, div_id, temperature, beta=0.5, rows=None):
    """(grid, args, meta) of the forward kernel: one program per token. ``rows`` [N] int8: where the student's
    terms are needed in teacher 0's slot beyond its own tokens (None: its own, ``valid``'s first row)."""
    B, T, V = student.shape
    config = _config(student, teachers)
    student_base, student_shift, pointers, columns, aligned = _located(student, teachers, config.vec)
    args = (student_base, *pointers, valid, valid if rows is None else rows, loss, stats, student_shift,
            student.stride(0), student.stride(1),
            *columns, T, V, B * T, len(teachers), LOG2E / temperature, 1.0 / temperature, float(beta))
    meta = dict(DIVERGENCE=div_id, KB=_slots(teachers), BLOCK_V=config.block_v, VEC=config.vec, ALIGNED=aligned,
                PRECISE_LOG2=_precise_log2(student, div_id), num_warps=config.num_warps)
    return (B * T,), args, meta


def backward_launch(student, teachers, valid, grad_loss, stats, grad, div_id, temperature, beta=0.5, dense=None,
                    rows=None):
    """(grid, args, meta) of the backward kernel: one program per (token, split of the vocabulary). ``dense``:
    a [N] fp32 multiplier M whose p_j M / T is added (top-k teachers' dense part), or None; ``rows`` as the
    forward's."""
    B, T, V = student.shape
    config = _config(student, teachers)
    student_base, student_shift, pointers, columns, aligned = _located(student, teachers, config.vec)
    grad_base, grad_shift = aligned_base(grad)
    student_rows, grad_rows = _rows(student, student_shift), _rows(grad, grad_shift)
    args = (student_base, *pointers, valid, valid if rows is None else rows, grad_loss,
            grad_loss if dense is None else dense, stats, grad_base, student_shift, grad_shift,
            student.stride(0), student.stride(1), grad.stride(0), grad.stride(1), *columns, T, V, B * T, len(teachers),
            LOG2E / temperature, 1.0 / temperature, float(beta))
    grid = (B * T, backward_splits(B * T, V, config.block_v))
    meta = dict(DIVERGENCE=div_id, KB=_slots(teachers), BLOCK_V=config.block_v, VEC=config.vec,
                TEACHER_ALIGNED=aligned, GRAD_ALIGNED=co_aligned(student_rows, grad_rows, (B, T), config.vec),
                PRECISE_LOG2=_precise_log2(student, div_id), DENSE=dense is not None, num_warps=config.num_warps)
    return grid, args, meta


def atoms_launch(student, teachers, valid, grad_loss, dense, stats, ids, logits, atom_grad, rows, grad, div_id,
                 temperature, beta=0.5):
    """(grid, args, meta) of kernels/token_mixture_bwd.py's atoms kernel (the logits and top-k teachers' pass):
    one program per token, the [N, A] atoms (A at most MAX_ATOM_BLOCK) in one block, one warp; ``logits`` [N, A]
    fp32 the student's raw logits at the ids."""
    B, T, V = student.shape
    config = _config(student, teachers)
    _, _, pointers, columns, _ = _located(student, teachers, config.vec)
    grad_base, grad_shift = aligned_base(grad)
    N, A = ids.shape
    args = (*pointers, valid, grad_loss, dense, stats, ids, logits, atom_grad, rows, grad_base, grad_shift,
            grad.stride(0), grad.stride(1), *columns, T, V, N, len(teachers), A, LOG2E / temperature,
            1.0 / temperature, float(beta))
    meta = dict(DIVERGENCE=div_id, KB=_slots(teachers), BLOCK_A=1 << max(0, (A - 1).bit_length()),
                PRECISE_LOG2=_precise_log2(student, div_id), num_warps=1)
    return (N,), args, meta


def jsd_partials_launch(student, teachers, valid, stats, partials, temperature, beta):
    """(grid, args, meta) of kernels/token_mixture.py's jsd partials kernel (jsd teachers on a vocabulary slice:
    its second pass with the merged normalizers in ``stats``, the sums into ``partials`` [K, 4, N])."""
    B, T, V = student.shape
    config = _config(student, teachers)
    student_base, student_shift, pointers, columns, aligned = _located(student, teachers, config.vec)
    args = (student_base, *pointers, valid, stats, partials, student_shift, student.stride(0), student.stride(1),
            *columns, T, V, B * T, len(teachers), LOG2E / temperature, float(beta))
    meta = dict(KB=_slots(teachers), BLOCK_V=config.block_v, VEC=config.vec, ALIGNED=aligned,
                PRECISE_LOG2=student.dtype == torch.float32, num_warps=config.num_warps)
    return (B * T,), args, meta


def jsd_partials(saved: MixtureSaved) -> torch.Tensor:
    """The launch's jsd second pass on a vocabulary slice (``jsd_partials_launch``), from its saved state with the
    merged statistics: [K, 4, N] fp32 (wpkl/parallel/merge.py: ``merge_jsd`` adds them over the ranks)."""
    K, _, N = saved.stats.shape
    partials = common.new_buffer(K, 4, N, dtype=torch.float32, device=saved.stats.device)
    if N > 0:
        grid, args, meta = jsd_partials_launch(saved.student, saved.teachers, saved.valid, saved.stats, partials,
                                               saved.spec.temperature, saved.spec.beta)
        launch(kernels().token_mixture_jsd_partials_kernel, grid, args, meta)
    return partials


class TritonMixturePass:
    @staticmethod
    def forward(student, teachers, valids, spec: LossSpec, rows=None):
        """``rows``: forward_launch's (the top-k teachers' tokens beside these, wpkl/backends/triton_logits_topk.py)."""
        k = kernels()
        B, T, _ = student.shape
        K, N = len(teachers), B * T
        loss = common.new_buffer(K, N, dtype=torch.float32, device=student.device)
        stats = common.new_buffer(K, k.NUM_STATS, N, dtype=torch.float32, device=student.device)
        valid = valids.reshape(K, N).to(torch.int8)
        div_id = divergence_id(spec.exact_divergence)
        if N > 0:
            grid, args, meta = forward_launch(student, teachers, valid, loss, stats, div_id, spec.temperature,
                                              spec.beta, rows)
            launch(k.token_mixture_fwd_kernel, grid, args, meta)
        public = stats[:, : k.NUM_PUBLIC_STATS].view(K, k.NUM_PUBLIC_STATS, B, T)
        saved = MixtureSaved(student, list(teachers), valid, stats, div_id, spec, rows)
        return loss.view(K, B, T), public, saved

    @staticmethod
    def backward(saved: MixtureSaved, coef: torch.Tensor, out: torch.Tensor, dense=None) -> torch.Tensor:
        """``dense``: [N] fp32, p_j dense_i / T added to every element (``backward_launch``)."""
        B, T, V = saved.student.shape
        K, N = len(saved.teachers), B * T
        if N > 0:
            coef = coef.reshape(K, N).to(torch.float32).contiguous()
            grid, args, meta = backward_launch(saved.student, saved.teachers, saved.valid, coef, saved.stats, out,
                                               saved.div_id, saved.spec.temperature, saved.spec.beta, dense,
                                               saved.rows)
            launch(kernels().token_mixture_bwd_kernel, grid, args, meta)
        return out
