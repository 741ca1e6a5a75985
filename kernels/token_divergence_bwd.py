"""Backward kernel: d loss / d student logits, one (token, vocabulary block) per program.

With g_i = d loss / d L_i (the weights and the reduction already folded in by autograd), the per-token
statistics from the forward kernel, and p, q, m, s, u as in the forward kernel:
    reverse_kl  dL/ds_j = p_j (log p_j - log q_j - D)
    forward_kl  dL/ds_j = p_j - q_j
    jsd(beta)   dL/ds_j = (1 - beta) p_j (log p_j - log m_j - KL(p || m))
    sampled     dL/ds_j = D (1[j = y] - p_j)
and d loss / d student_j = g_i / T * dL/ds_j (the teacher gets no gradient).

Passes over [N, V]: one, on a 2-D grid (token x vocabulary block) so that few tokens still fill the GPU:
the normalizers are per-token statistics, so no program needs another's result.
Memory per valid token: reads V * (bytes(student) + bytes(teacher)) (V * bytes(student) for "sampled", which
never reads the teacher), writes V * bytes(student);
masked tokens read nothing and write zeros. The gradient may alias the student logits (in-place backward):
each element is read before it is written, by the same program.
"""

import triton
import triton.language as tl

from .common import (
    JSD,
    FORWARD_KL,
    REVERSE_KL,
    SAMPLED,
    STAT_DIVERGENCE,
    STAT_LSE_GAP,
    STAT_MIXTURE_KL,
    STAT_STUDENT_LSE,
    STAT_TEACHER_LSE,
    mixture_log_ratios,
    row_offset,
    xlogy_term,
)


@triton.jit
def token_divergence_bwd_kernel(
    # pointers
    student_ptr,  # [B, T, V] logits, last dim contiguous
    teacher_ptr,  # [B, T, V_t >= V] logits, last dim contiguous
    valid_ptr,  # [N] int8
    tokens_ptr,  # [N] int64 (SAMPLED only)
    grad_loss_ptr,  # [N] fp32: d loss / d L_i
    stats_ptr,  # [NUM_STATS, N] fp32 from the forward kernel
    grad_ptr,  # [B, T, V] out, student dtype
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
    inv_temperature,
    beta,
    DIVERGENCE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < V
    is_valid = tl.load(valid_ptr + row) != 0
    load_mask = offs < tl.where(is_valid, V, 0)
    # Masked tokens get coefficient 0 and -inf logits (p = q = 0): an exact zero gradient, no reads.
    coef = tl.where(is_valid, tl.load(grad_loss_ptr + row) * inv_temperature, 0.0)
    stats_row = stats_ptr + row
    lse_s = tl.load(stats_row + STAT_STUDENT_LSE * N)
    divergence = tl.load(stats_row + STAT_DIVERGENCE * N)

    s_raw = tl.load(student_ptr + row_offset(row, T, stride_student_b, stride_student_t) + offs, mask=load_mask,
                    other=-float("inf")).to(tl.float32)
    p = tl.exp(s_raw * inv_temperature - lse_s)
    if DIVERGENCE == SAMPLED:
        token = tl.load(tokens_ptr + row)
        grad = divergence * (tl.where(offs == token, 1.0, 0.0) - p)
    else:
        lse_u = tl.load(stats_row + STAT_TEACHER_LSE * N)
        u_raw = tl.load(teacher_ptr + row_offset(row, T, stride_teacher_b, stride_teacher_t) + offs, mask=load_mask,
                        other=-float("inf")).to(tl.float32)
        # log p - log q = (s - u) / T - (lse_s - lse_u): the logits are subtracted first, exact when close.
        if DIVERGENCE == REVERSE_KL:
            shift = tl.load(stats_row + STAT_LSE_GAP * N) + divergence
            grad = xlogy_term(p, (s_raw - u_raw) * inv_temperature - shift)
        if DIVERGENCE == FORWARD_KL:
            grad = p - tl.exp(u_raw * inv_temperature - lse_u)
        if DIVERGENCE == JSD:
            log_ratio = (u_raw - s_raw) * inv_temperature + tl.load(stats_row + STAT_LSE_GAP * N)  # log q - log p
            log_p_m, _ = mixture_log_ratios(log_ratio, tl.log(1.0 - beta), tl.log(beta))
            mixture_kl = tl.load(stats_row + STAT_MIXTURE_KL * N)
            grad = (1.0 - beta) * xlogy_term(p, log_p_m - mixture_kl)
    grad_row = grad_ptr + row_offset(row, T, stride_grad_b, stride_grad_t)
    tl.store(grad_row + offs, (coef * grad).to(grad_ptr.dtype.element_ty), mask=in_vocab)
