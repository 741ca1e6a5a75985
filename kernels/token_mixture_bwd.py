"""The backward kernel of several teachers' logits in one pass (kernels/token_mixture.py has the forward, the
teachers' addressing and the math: its docstring), one (token, split of the vocabulary) per program as in
token_divergence_bwd.py: the student row and each seeing teacher's read once, the gradient written once.

With DENSE, a per-token multiplier M (``dense_ptr``) adds p_j M / T to every element, on the rows ``rows_ptr``
sets too (the student's terms in teacher 0's slot): the dense part of top-k teachers' gradients
(wpkl/backends/triton_logits_topk.py: M = sum_k c_k Lambda_k) in the same pass; ``token_mixture_atoms_kernel``
then rewrites their atom columns whole.
"""

import triton
import triton.language as tl

from .common import (
    FORWARD_KL,
    JSD,
    LN2,
    NEG_INF,
    REVERSE_KL,
    STAT_AUX,
    STAT_LSE_GAP,
    STAT_STUDENT_LSE,
    STAT_TEACHER_LSE,
    aligned_split,
    assume_multiple,
    device_function,
    edge_columns,
    exp2_approx,
    mixture_log2_ratios,
    mixture_r,
    reduce_max,
    reduce_sum,
    row_offset,
    to_float,
    xlogy_term,
)
from .token_divergence_bwd import zero_row
from .token_mixture import STATS, _load_teachers, _teachers


@device_function
def _grad(s, u, scale, lse_s, lse_u, lse_gap, aux, c, total, inv_temperature, log2_1m_beta, log2_beta, jsd_coef,
          dense, DIVERGENCE: tl.constexpr, PRECISE_LOG2: tl.constexpr, DENSE: tl.constexpr):
    """d loss / d s_raw of a student block ``s`` from its [KB, *s.shape] teachers' block ``u``; ``c``, ``aux``,
    ``lse_u`` and ``lse_gap`` expanded to u's rank (c = 0 for a teacher that does not see the token), ``total`` =
    sum_k c_k, ``jsd_coef`` = -(1 - beta) ln 2 / T; with DENSE, plus p ``dense`` (= M / T)."""
    p = exp2_approx((s - lse_s) * scale)
    if DIVERGENCE == REVERSE_KL:
        # the logits subtracted first, per teacher; 0 where c_k = 0 (its u may be anything)
        inner = reduce_sum(tl.where(c != 0, c * ((tl.expand_dims(s, 0) - u) - aux), 0.0), 0)
        grad = xlogy_term(p, inner) * (inv_temperature * inv_temperature)
    if DIVERGENCE == FORWARD_KL:
        q = exp2_approx((u - lse_u) * scale)
        grad = (total * p - reduce_sum(tl.where(c != 0, c * q, 0.0), 0)) * inv_temperature
    if DIVERGENCE == JSD:
        # p (log2(p / m_k) - KL2(p || m_k)) per teacher, aux_k = KL2(p || m_k) (token_divergence_bwd.py's)
        log2_m_p, _ = mixture_log2_ratios(mixture_r(tl.expand_dims(s, 0), u, scale, lse_gap), log2_1m_beta,
                                          log2_beta, PRECISE_LOG2)
        grad = xlogy_term(p, reduce_sum(tl.where(c != 0, c * (log2_m_p + aux), 0.0), 0)) * jsd_coef
    if DENSE:
        grad += p * dense
    return grad


@device_function
def _row_terms(stats_ptr, grad_loss_ptr, dense_ptr, on, student_on, k64, row, N, beta, inv_temperature,
               DIVERGENCE: tl.constexpr, DENSE: tl.constexpr):
    """A token's terms of ``_grad``: each teacher's c, aux, lse_u and lse gap as [KB, 1] (from the [K, N]
    coefficients and the [K, NUM_STATS, N] statistics), sum_k c_k, the student's lse (from the slots
    ``student_on`` sets), jsd's constants and the dense multiplier / T (0 without DENSE)."""
    stats = stats_ptr + k64 * (STATS * N) + row
    c = tl.where(on, tl.load(grad_loss_ptr + k64 * N + row, mask=on, other=0.0), 0.0)
    total = reduce_sum(c, 0)
    lse_s = reduce_max(tl.where(student_on, tl.load(stats + STAT_STUDENT_LSE * N, mask=student_on, other=0.0),
                                NEG_INF), 0)
    aux = tl.load(stats + STAT_AUX * N, mask=on, other=0.0)
    lse_u = tl.load(stats + STAT_TEACHER_LSE * N, mask=on, other=0.0)
    lse_gap = tl.load(stats + STAT_LSE_GAP * N, mask=on, other=0.0)
    log2_1m_beta = 0.0
    log2_beta = 0.0
    jsd_coef = 0.0
    if DIVERGENCE == JSD:
        beta = tl.cast(beta, tl.float32)
        log2_1m_beta = tl.math.log2(1.0 - beta)
        log2_beta = tl.math.log2(beta)
        jsd_coef = -(1.0 - beta) * LN2 * inv_temperature
    dense = 0.0
    if DENSE:
        dense = tl.load(dense_ptr + row) * inv_temperature
    return (c[:, None], total, lse_s, aux[:, None], lse_u[:, None], lse_gap[:, None], log2_1m_beta, log2_beta,
            jsd_coef, dense)


@triton.jit
def token_mixture_bwd_kernel(
    student_ptr,  # [B, T, V] logits
    teacher0_ptr,  # as the forward's
    teacher1_ptr,
    teacher2_ptr,
    teacher3_ptr,
    valid_ptr,  # [K, N] int8
    rows_ptr,  # [N] int8: as the forward's (the rows whose student's terms are in teacher 0's slot)
    grad_loss_ptr,  # [K, N] fp32: d loss / d L_k,i
    dense_ptr,  # [N] fp32: the dense multiplier M (read with DENSE)
    stats_ptr,  # [K, NUM_STATS, N] fp32 from the forward kernel
    grad_ptr,  # [B, T, V] out, student dtype
    student_shift,
    grad_shift,
    stride_student_b,
    stride_student_t,
    stride_grad_b,
    stride_grad_t,
    shift0, shift1, shift2, shift3,
    stride_b0, stride_b1, stride_b2, stride_b3,
    stride_t0, stride_t1, stride_t2, stride_t3,
    T,
    V,
    N,
    K,
    scale,
    inv_temperature,
    beta,
    DIVERGENCE: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    TEACHER_ALIGNED: tl.constexpr,
    GRAD_ALIGNED: tl.constexpr,
    PRECISE_LOG2: tl.constexpr,
    DENSE: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    ks = tl.arange(0, KB)
    k64 = ks.to(tl.int64)
    in_k = ks < K
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    grad_row = grad_shift + row_offset(row, T, stride_grad_b, stride_grad_t)
    teacher_ptr = teacher0_ptr
    rows = _teachers(teacher0_ptr, teacher1_ptr, teacher2_ptr, teacher3_ptr, shift0, shift1, shift2, shift3,
                                  stride_b0, stride_b1, stride_b2, stride_b3, stride_t0, stride_t1, stride_t2, stride_t3,
                                  row, T, KB)
    on = tl.load(valid_ptr + k64 * N + row, mask=in_k, other=0) != 0
    need = (tl.load(rows_ptr + row).to(tl.int32) + tl.zeros([KB], tl.int32)) != 0  # ([KB]: the interpreter's masks)
    student_on = on | ((ks == 0) & need)
    is_valid = reduce_max(student_on.to(tl.int32), 0) != 0
    cols = tl.arange(0, BLOCK_V)
    peel, num_full, tail_start, tail_len = aligned_split(student_row, V, VEC, BLOCK_V)
    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, V, VEC)
    takes_tail = split == num_full % num_splits
    out_dtype = grad_ptr.dtype.element_ty

    if is_valid:
        c1, total, lse_s, aux1, lse_u1, gap1, log2_1m_beta, log2_beta, jsd_coef, dense = _row_terms(
            stats_ptr, grad_loss_ptr, dense_ptr, on, student_on, k64, row, N, beta, inv_temperature, DIVERGENCE,
            DENSE)
        for block in range(split, num_full, num_splits):
            start = peel + block * BLOCK_V
            s = to_float(tl.load(student_ptr + assume_multiple(student_row + start, VEC) + cols))
            u = _load_teachers(teacher_ptr, rows, start, cols, on, None, 0.0, VEC, TEACHER_ALIGNED, False)
            grad = _grad(s, u, scale, lse_s, lse_u1, gap1, aux1, c1, total, inv_temperature, log2_1m_beta, log2_beta,
                         jsd_coef, dense, DIVERGENCE, PRECISE_LOG2, DENSE)
            grad_start = grad_row + start
            if GRAD_ALIGNED:
                grad_start = assume_multiple(grad_start, VEC)
            tl.store(grad_ptr + grad_start + cols, grad.to(out_dtype))
        if takes_tail:
            if tail_len > 0:
                in_tail = cols < tail_len
                s = to_float(tl.load(student_ptr + assume_multiple(student_row + tail_start, VEC) + cols,
                                     mask=in_tail, other=NEG_INF))
                u = _load_teachers(teacher_ptr, rows, tail_start, cols, on, in_tail, 0.0, VEC, TEACHER_ALIGNED, True)
                grad = _grad(s, u, scale, lse_s, lse_u1, gap1, aux1, c1, total, inv_temperature, log2_1m_beta, log2_beta,
                         jsd_coef, dense, DIVERGENCE, PRECISE_LOG2, DENSE)
                grad_start = grad_row + tail_start
                if GRAD_ALIGNED:
                    grad_start = assume_multiple(grad_start, VEC)
                tl.store(grad_ptr + grad_start + cols, grad.to(out_dtype), mask=in_tail)
            s = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
            u = _load_teachers(teacher_ptr, rows, 0, edge_col, on, edge_mask, 0.0, VEC, False, True)
            grad = _grad(s, u, scale, lse_s, lse_u1[:, :, None], gap1[:, :, None], aux1[:, :, None],
                         c1[:, :, None], total, inv_temperature, log2_1m_beta, log2_beta, jsd_coef, dense, DIVERGENCE,
                         PRECISE_LOG2, DENSE)
            tl.store(grad_ptr + grad_row + edge_col, grad.to(out_dtype), mask=edge_mask)
    else:
        zero_row(grad_ptr, grad_row, cols, peel, num_full, tail_start, tail_len, edge_col, edge_mask, split, num_splits,
                 takes_tail, BLOCK_V, VEC, GRAD_ALIGNED)


@triton.jit
def token_mixture_atoms_kernel(
    teacher0_ptr,  # as the backward's
    teacher1_ptr,
    teacher2_ptr,
    teacher3_ptr,
    valid_ptr,  # [K, N] int8: the logits teachers' kernel rows
    grad_loss_ptr,  # [K, N] fp32: their coefficients
    dense_ptr,  # [N] fp32: the top-k teachers' dense multiplier M = sum_k c_k Lambda_k
    stats_ptr,  # [K, NUM_STATS, N] fp32
    ids_ptr,  # [N, A] int64: the top-k teachers' merged atoms (distinct per row, -1 pads)
    logit_ptr,  # [N, A] fp32: the student's logits at them (gathered before the backward kernel, which may
    # have written the gradient over the logits: the fused-linear form's chunks)
    atom_grad_ptr,  # [N, A] fp32: sum_k c_k A_k at them
    rows_ptr,  # [N] int8: some top-k teacher sees the row (the student's terms are in teacher 0's slot there)
    grad_ptr,  # [B, T, V] out (the backward kernel's, rewritten at the atoms)
    grad_shift,
    stride_grad_b,
    stride_grad_t,
    shift0, shift1, shift2, shift3,
    stride_b0, stride_b1, stride_b2, stride_b3,
    stride_t0, stride_t1, stride_t2, stride_t3,
    T,
    V,
    N,
    K,
    A,
    scale,
    inv_temperature,
    beta,
    DIVERGENCE: tl.constexpr,
    KB: tl.constexpr,
    BLOCK_A: tl.constexpr,
    PRECISE_LOG2: tl.constexpr,
):
    """Logits and top-k teachers (wpkl/backends/triton_logits_topk.py): each atom column's whole gradient in
    float32, the logits teachers' and the dense part's (``_grad`` with DENSE, the backward kernel's own math, at
    the atom ids, from the student's logits there gathered before the backward kernel ran) plus sum_k c_k A_k,j / T, written once over the backward kernel's value: every element is
    rounded once. One program per token; O(K A) bytes."""
    row = tl.program_id(0)
    if tl.load(rows_ptr + row) != 0:
        ks = tl.arange(0, KB)
        k64 = ks.to(tl.int64)
        on = tl.load(valid_ptr + k64 * N + row, mask=ks < K, other=0) != 0
        atoms = tl.arange(0, BLOCK_A)
        offs = row.to(tl.int64) * A + atoms
        ids = tl.load(ids_ptr + offs, mask=atoms < A, other=-1)
        atom = (ids >= 0) & (ids < V)  # out-of-range ids (reported by the value checks) are never written
        a = tl.load(atom_grad_ptr + offs, mask=atom, other=0.0)
        grad_row = grad_shift + row_offset(row, T, stride_grad_b, stride_grad_t)
        rows = _teachers(teacher0_ptr, teacher1_ptr, teacher2_ptr, teacher3_ptr, shift0, shift1, shift2, shift3,
                         stride_b0, stride_b1, stride_b2, stride_b3, stride_t0, stride_t1, stride_t2, stride_t3,
                         row, T, KB)
        c1, total, lse_s, aux1, lse_u1, gap1, log2_1m_beta, log2_beta, jsd_coef, dense = _row_terms(
            stats_ptr, grad_loss_ptr, dense_ptr, on, on | (ks == 0), k64, row, N, beta, inv_temperature,
            DIVERGENCE, True)
        s = tl.load(logit_ptr + offs, mask=atom, other=NEG_INF)
        u = _load_teachers(teacher0_ptr, rows, 0, ids, on, atom, 0.0, 1, False, True)
        grad = _grad(s, u, scale, lse_s, lse_u1, gap1, aux1, c1, total, inv_temperature, log2_1m_beta, log2_beta,
                     jsd_coef, dense, DIVERGENCE, PRECISE_LOG2, True)
        value = grad + a * inv_temperature
        tl.store(grad_ptr + grad_row + ids, value.to(grad_ptr.dtype.element_ty), mask=atom)
