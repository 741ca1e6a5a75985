"""Backward kernel: d loss / d student logits, one (token, vocabulary split) per program.

With g_i = d loss / d L_i (the weights and the reduction already folded in by autograd), the per-token
statistics from the forward kernel, and p, q, m, s, u as in the forward kernel:
    reverse_kl  dL/ds_j = p_j (log p_j - log q_j - D)
    forward_kl  dL/ds_j = p_j - q_j
    jsd(beta)   dL/ds_j = (1 - beta) p_j (log p_j - log m_j - KL(p || m))
    sampled     dL/ds_j = -a (1[j = y] - p_j), -a from STAT_AUX (D, or PowerOPD's p(y)^power - q(y)^power)
and d loss / d student_j = g_i / T * dL/ds_j (the teacher gets no gradient). With raw logits and the forward's
statistics in raw units (kernels/common.py), p_j = 2^((s_j - lse_s) c) with c = log2(e) / T (one ex2.approx),
and log p_j - log q_j - D = ((s_j - u_j) - E_p[s - u]) / T: the logits are subtracted before any scaling, and
a row whose mass sits on one token gets an exactly zero gradient.

Passes over [N, V]: one, on a 2-D grid (token x split of the vocabulary): the normalizers are per-token
statistics, so no program needs another's result, and the host picks enough splits that few tokens still
fill the GPU. Each program loops over the row's aligned, unmasked blocks j = split, split + num_splits, ...
(16-byte loads and stores, split as in the forward kernel: kernels/common.py aligned_split); the program
that would take block num_full also takes the tail block (masked per 16-byte chunk) and the edges (the
peel before the first 16-byte boundary and the last partial chunk, scalar accesses).
Memory per valid token: reads V * (bytes(student) + bytes(teacher)) (V * bytes(student) for "sampled", which
never reads the teacher), writes V * bytes(student);
masked tokens read nothing and write zeros. The gradient may alias the student logits (in-place backward):
each element is read before it is written, by the same program.
"""

import triton
import triton.language as tl

from .common import (
    FORWARD_KL,
    JSD,
    LN2,
    NEG_INF,
    REVERSE_KL,
    SAMPLED,
    STAT_AUX,
    STAT_LSE_GAP,
    STAT_STUDENT_LSE,
    STAT_TEACHER_LSE,
    aligned_split,
    assume_multiple,
    device_function,
    edge_columns,
    load_logits,
    exp2_approx,
    mixture_log2_ratios,
    mixture_r,
    row_offset,
    to_float,
    xlogy_term,
)


@device_function
def _grad_block(s, u, col, token, scale, lse_s, lse_u, lse_gap, aux, coef, log2_1m_beta, log2_beta,
                DIVERGENCE: tl.constexpr, PRECISE_LOG2: tl.constexpr):
    """d loss / d s_raw of one block of raw logits, with coef = g_i / T times the divergence's constant."""
    p = exp2_approx((s - lse_s) * scale)
    if DIVERGENCE == REVERSE_KL:
        # coef = g / T^2: p ((s - u) - E_p[s - u]) g / T^2, the logits subtracted first.
        grad = coef * xlogy_term(p, (s - u) - aux)
    if DIVERGENCE == FORWARD_KL:
        grad = coef * (p - exp2_approx((u - lse_u) * scale))
    if DIVERGENCE == JSD:
        # coef = -g / T (1 - beta) ln 2: p (log2(p / m) - KL2(p || m)) with aux = KL2(p || m).
        log2_m_p, _ = mixture_log2_ratios(mixture_r(s, u, scale, lse_gap), log2_1m_beta, log2_beta, PRECISE_LOG2)
        grad = coef * xlogy_term(p, log2_m_p + aux)
    if DIVERGENCE == SAMPLED:
        # coef = g / T (-a)
        grad = coef * (tl.where(col == token, 1.0, 0.0) - p)
    return grad


@device_function
def zero_row(grad_ptr, grad_row, cols, peel, num_full, tail_start, tail_len, edge_col, edge_mask, split, num_splits,
             takes_tail, BLOCK_V: tl.constexpr, VEC: tl.constexpr, GRAD_ALIGNED: tl.constexpr):
    """A masked token's gradient row: this program's share of zeros (its blocks; the tail and the edges if it
    takes them), the same accesses as a valid row's stores (also kernels/token_mixture.py's)."""
    out_dtype = grad_ptr.dtype.element_ty
    zeros = tl.full([BLOCK_V], 0, out_dtype)
    for block in range(split, num_full, num_splits):
        grad_start = grad_row + peel + block * BLOCK_V
        if GRAD_ALIGNED:
            grad_start = assume_multiple(grad_start, VEC)
        tl.store(grad_ptr + grad_start + cols, zeros)
    if takes_tail:
        if tail_len > 0:
            grad_start = grad_row + tail_start
            if GRAD_ALIGNED:
                grad_start = assume_multiple(grad_start, VEC)
            tl.store(grad_ptr + grad_start + cols, zeros, mask=cols < tail_len)
        tl.store(grad_ptr + grad_row + edge_col, tl.full([2 * VEC, 1], 0, out_dtype), mask=edge_mask)


@triton.jit
def token_divergence_bwd_kernel(
    # pointers (16-byte aligned: the host passes the aligned base and the element shift below)
    student_ptr,  # [B, T, V] logits, last dim contiguous
    teacher_ptr,  # [B, T, V_t >= V] logits, last dim contiguous
    valid_ptr,  # [N] int8
    tokens_ptr,  # [N] int64 (SAMPLED only)
    grad_loss_ptr,  # [N] fp32: d loss / d L_i
    stats_ptr,  # [NUM_STATS, N] fp32 from the forward kernel
    grad_ptr,  # [B, T, V] out, student dtype
    # element offsets of the tensors' first elements from their pointers (< VEC)
    student_shift,
    teacher_shift,
    grad_shift,
    # strides
    stride_student_b,
    stride_student_t,
    stride_teacher_b,
    stride_teacher_t,
    stride_grad_b,
    stride_grad_t,
    # sizes
    T,
    V,
    N,
    # meta
    scale,  # log2(e) / T
    inv_temperature,
    beta,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes of the wider logits dtype
    TEACHER_ALIGNED: tl.constexpr,  # the teacher's rows share the student's misalignment
    GRAD_ALIGNED: tl.constexpr,  # the gradient's rows share the student's misalignment
    PRECISE_LOG2: tl.constexpr,  # fp32 student: jsd's mixture log2 is the precise one (kernels/common.py)
):
    beta = tl.cast(beta, tl.float32)  # as on the GPU (the interpreter would keep a Python float's precision)
    row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    teacher_row = teacher_shift + row_offset(row, T, stride_teacher_b, stride_teacher_t)
    grad_row = grad_shift + row_offset(row, T, stride_grad_b, stride_grad_t)
    cols = tl.arange(0, BLOCK_V)
    peel, num_full, tail_start, tail_len = aligned_split(student_row, V, VEC, BLOCK_V)
    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, V, VEC)
    takes_tail = split == num_full % num_splits  # the program that would take block num_full
    out_dtype = grad_ptr.dtype.element_ty

    if tl.load(valid_ptr + row) != 0:
        stats_row = stats_ptr + row
        lse_s = tl.load(stats_row + STAT_STUDENT_LSE * N)
        lse_u = 0.0
        lse_gap = 0.0
        aux = 0.0
        token = 0
        log2_1m_beta = 0.0
        log2_beta = 0.0
        coef = tl.load(grad_loss_ptr + row) * inv_temperature  # g_i / T
        if DIVERGENCE == REVERSE_KL:
            coef = coef * inv_temperature
            aux = tl.load(stats_row + STAT_AUX * N)
        if DIVERGENCE == FORWARD_KL:
            lse_u = tl.load(stats_row + STAT_TEACHER_LSE * N)
        if DIVERGENCE == JSD:
            log2_1m_beta = tl.math.log2(1.0 - beta)
            log2_beta = tl.math.log2(beta)
            coef = -coef * (1.0 - beta) * LN2
            lse_gap = tl.load(stats_row + STAT_LSE_GAP * N)
            aux = tl.load(stats_row + STAT_AUX * N)
        if DIVERGENCE == SAMPLED:
            coef = coef * tl.load(stats_row + STAT_AUX * N)  # -a
            token = tl.load(tokens_ptr + row)
        # The vocabulary loop: aligned, unmasked blocks.
        for block in range(split, num_full, num_splits):
            start = peel + block * BLOCK_V
            s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, start, cols, None, VEC,
                                       DIVERGENCE != SAMPLED, TEACHER_ALIGNED, False)  # "sampled": no teacher
            grad = _grad_block(s_raw, u_raw, start + cols, token, scale, lse_s, lse_u, lse_gap, aux, coef,
                               log2_1m_beta, log2_beta, DIVERGENCE, PRECISE_LOG2)
            grad_start = grad_row + start
            if GRAD_ALIGNED:
                grad_start = assume_multiple(grad_start, VEC)
            tl.store(grad_ptr + grad_start + cols, grad.to(out_dtype))
        if takes_tail:
            # The tail block: aligned too, masked per 16-byte chunk.
            if tail_len > 0:
                in_tail = cols < tail_len
                s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, tail_start, cols,
                                           in_tail, VEC, DIVERGENCE != SAMPLED, TEACHER_ALIGNED, True)
                grad = _grad_block(s_raw, u_raw, tail_start + cols, token, scale, lse_s, lse_u, lse_gap, aux, coef,
                                   log2_1m_beta, log2_beta, DIVERGENCE, PRECISE_LOG2)
                grad_start = grad_row + tail_start
                if GRAD_ALIGNED:
                    grad_start = assume_multiple(grad_start, VEC)
                tl.store(grad_ptr + grad_start + cols, grad.to(out_dtype), mask=in_tail)
            # The edges: scalar accesses.
            s_raw = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
            if DIVERGENCE != SAMPLED:
                u_raw = to_float(tl.load(teacher_ptr + teacher_row + edge_col, mask=edge_mask, other=NEG_INF))
            else:
                u_raw = s_raw
            grad = _grad_block(s_raw, u_raw, edge_col, token, scale, lse_s, lse_u, lse_gap, aux, coef,
                               log2_1m_beta, log2_beta, DIVERGENCE, PRECISE_LOG2)
            tl.store(grad_ptr + grad_row + edge_col, grad.to(out_dtype), mask=edge_mask)
    else:
        # A masked token: zeros, and nothing read.
        zero_row(grad_ptr, grad_row, cols, peel, num_full, tail_start, tail_len, edge_col, edge_mask, split, num_splits,
                 takes_tail, BLOCK_V, VEC, GRAD_ALIGNED)
