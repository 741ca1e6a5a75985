"""Forward kernel: one token per program, online log-sum-exp over the vocabulary.

Math (s = student / T, u = teacher[:V] / T, p = softmax(s), q = softmax(u); wpkl/reference.py is the spec):
    reverse_kl  D = E_p[s - u] - lse(s) + lse(u)
    forward_kl  D = E_q[u - s] - lse(u) + lse(s)
    jsd(beta)   D = beta KL(q || m) + (1 - beta) KL(p || m),  m = (1 - beta) p + beta q
    sampled     D = log p(y) - log q(y),  L = D * log p(y)  (= -a log p(y) with a = -D held constant);
                log q(y) may come from teacher_logprobs instead of teacher logits (TEACHER_LOGITS=False: the
                teacher row is never read) and log p(y) in D from rollout_logprobs (HAS_ROLLOUT)
For every divergence but "sampled", L = D. Per token it also writes the teacher confidence max q = 1 / Z_u
(Z_u the teacher's sum of exp(u - max u)), the entropies lse - E[.] of p and q, both log-normalizers
their exact difference and, for jsd, KL(p || m) for the backward pass.

Passes over [N, V]: one, reading each student and teacher logit once with running max and rescaled sums
for both distributions (for "sampled", two extra scalar loads of the logits at token y). jsd makes a
second pass, because log m needs both finished normalizers and is not linear in the logits
(3 exp + 2 log per element there, computed from log q - log p so that close distributions lose nothing).
Memory per valid token: reads V * (bytes(student) + bytes(teacher)) (twice for jsd; V * bytes(student)
for "sampled" with teacher_logprobs), writes 4 * (1 + 8) bytes. Masked tokens read nothing and write zeros.
"""

import triton
import triton.language as tl

from .common import (
    JSD,
    FORWARD_KL,
    REVERSE_KL,
    SAMPLED,
    STAT_CONFIDENCE,
    STAT_DIVERGENCE,
    STAT_LSE_GAP,
    STAT_MIXTURE_KL,
    STAT_STUDENT_ENTROPY,
    STAT_STUDENT_LSE,
    STAT_TEACHER_ENTROPY,
    STAT_TEACHER_LSE,
    mixture_log_ratios,
    online_softmax_step,
    row_offset,
    xlogy_term,
)


@triton.jit
def token_divergence_fwd_kernel(
    # pointers
    student_ptr,  # [B, T, V] logits, last dim contiguous
    teacher_ptr,  # [B, T, V_t >= V] logits, last dim contiguous (unread unless TEACHER_LOGITS)
    valid_ptr,  # [N] int8: 0 = token ignored
    tokens_ptr,  # [N] int64 sampled tokens (SAMPLED only)
    teacher_logprobs_ptr,  # [N] fp32 log q(y) (SAMPLED without TEACHER_LOGITS only)
    rollout_ptr,  # [N] fp32 log p(y) under the sampling policy (HAS_ROLLOUT only)
    loss_ptr,  # [N] fp32 out: per-token loss L
    stats_ptr,  # [NUM_STATS, N] fp32 out
    # strides
    stride_student_b,
    stride_student_t,
    stride_teacher_b,
    stride_teacher_t,
    # sizes
    T,
    V,
    N,
    # meta
    inv_temperature,
    beta,
    DIVERGENCE: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,  # False: "sampled" with log q(y) given, the teacher row is never read
    HAS_ROLLOUT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    student_row = student_ptr + row_offset(row, T, stride_student_b, stride_student_t)
    teacher_row = teacher_ptr + row_offset(row, T, stride_teacher_b, stride_teacher_t)
    is_valid = tl.load(valid_ptr + row) != 0
    # A masked token runs zero iterations: nothing is read, and its outputs are zeroed below.
    num_blocks = tl.where(is_valid, tl.cdiv(V, BLOCK_V), 0)
    cols = tl.arange(0, BLOCK_V)

    # Running maxima and sums rescaled to them, for student (s) and teacher (u).
    max_s = -float("inf")
    max_u = -float("inf")
    sum_s = 0.0  # sum exp(s - max_s)
    sum_u = 0.0  # sum exp(u - max_u)
    sum_s_s = 0.0  # sum exp(s - max_s) * s  -> E_p[s]
    sum_u_u = 0.0  # sum exp(u - max_u) * u  -> E_q[u]
    sum_cross = 0.0  # reverse: sum exp(s - max_s) (s - u);  forward: sum exp(u - max_u) (u - s)
    for block in range(0, num_blocks):
        offs = block * BLOCK_V + cols
        in_vocab = offs < V
        # Both loads first, so that they are in flight together.
        s_raw = tl.load(student_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
        if TEACHER_LOGITS:
            u_raw = tl.load(teacher_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
            # Differences of logits are taken before scaling by 1 / T: exact when the logits are close.
            if DIVERGENCE == REVERSE_KL:
                cross = (s_raw - u_raw) * inv_temperature
            if DIVERGENCE == FORWARD_KL:
                cross = (u_raw - s_raw) * inv_temperature
        s = s_raw * inv_temperature
        max_s, rescale_s, exp_s, sum_s, sum_s_s = online_softmax_step(s, max_s, sum_s, sum_s_s)
        if TEACHER_LOGITS:
            u = u_raw * inv_temperature
            max_u, rescale_u, exp_u, sum_u, sum_u_u = online_softmax_step(u, max_u, sum_u, sum_u_u)
            if DIVERGENCE == REVERSE_KL:
                sum_cross = sum_cross * rescale_s + tl.sum(xlogy_term(exp_s, cross), axis=0)
            if DIVERGENCE == FORWARD_KL:
                sum_cross = sum_cross * rescale_u + tl.sum(xlogy_term(exp_u, cross), axis=0)

    # Combine the shifted pieces before adding large magnitudes: with lse_gap = (max_s - max_u) +
    # (log sum_s - log sum_u), D = E_p[s - u] - lse_gap is exact when p == q, where lse_s - lse_u is not.
    log_sum_s = tl.log(sum_s)
    lse_s = max_s + log_sum_s
    student_entropy = log_sum_s - (sum_s_s / sum_s - max_s)
    if TEACHER_LOGITS:
        log_sum_u = tl.log(sum_u)
        lse_u = max_u + log_sum_u
        lse_gap = (max_s - max_u) + (log_sum_s - log_sum_u)
        teacher_entropy = log_sum_u - (sum_u_u / sum_u - max_u)
        confidence = 1.0 / sum_u
    else:
        lse_u = 0.0
        lse_gap = 0.0
        teacher_entropy = float("nan")  # unknown without the teacher's logits
        confidence = float("nan")
    mixture_kl = 0.0
    loss = 0.0
    if DIVERGENCE == REVERSE_KL:
        divergence = sum_cross / sum_s - lse_gap
    if DIVERGENCE == FORWARD_KL:
        divergence = sum_cross / sum_u + lse_gap
    if DIVERGENCE == SAMPLED:
        token = tl.load(tokens_ptr + row, mask=is_valid, other=0)
        s_y = tl.load(student_row + token, mask=is_valid, other=0.0).to(tl.float32)
        log_p_y = (s_y * inv_temperature - max_s) - log_sum_s
        if TEACHER_LOGITS:
            u_y = tl.load(teacher_row + token, mask=is_valid, other=0.0).to(tl.float32)
            log_q_y = (u_y * inv_temperature - max_u) - log_sum_u
        else:
            log_q_y = tl.load(teacher_logprobs_ptr + row, mask=is_valid, other=0.0)
        if HAS_ROLLOUT:
            divergence = tl.load(rollout_ptr + row, mask=is_valid, other=0.0) - log_q_y
        elif TEACHER_LOGITS:
            divergence = (s_y - u_y) * inv_temperature - lse_gap  # log p(y) - log q(y), the logits subtracted first
        else:
            divergence = log_p_y - log_q_y
        # divergence = -a, held constant
        loss = divergence * log_p_y  # -a log p(y)
    if DIVERGENCE == JSD:
        # Second pass: log m needs both finished normalizers.
        log_1m_beta = tl.log(1.0 - beta)
        log_beta = tl.log(beta)
        # Normalizing by the mass sums of the same p and q cancels the rounding of lse_s and lse_u that all
        # terms share: with a saturated jsd the backward's log p/m - KL(p || m) cancels down to that size.
        kl_qm = 0.0
        kl_pm = 0.0
        mass_q = 0.0
        mass_p = 0.0
        for block in range(0, num_blocks):
            offs = block * BLOCK_V + cols
            in_vocab = offs < V
            s_raw = tl.load(student_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
            u_raw = tl.load(teacher_row + offs, mask=in_vocab, other=-float("inf")).to(tl.float32)
            log_ratio = (u_raw - s_raw) * inv_temperature + lse_gap  # log q - log p
            log_p_m, log_q_m = mixture_log_ratios(log_ratio, log_1m_beta, log_beta)
            p = tl.exp(s_raw * inv_temperature - lse_s)
            q = tl.exp(u_raw * inv_temperature - lse_u)
            kl_qm += tl.sum(xlogy_term(q, log_q_m), axis=0)
            kl_pm += tl.sum(xlogy_term(p, log_p_m), axis=0)
            mass_q += tl.sum(q, axis=0)
            mass_p += tl.sum(p, axis=0)
        kl_qm = kl_qm / mass_q
        kl_pm = kl_pm / mass_p
        divergence = beta * kl_qm + (1.0 - beta) * kl_pm
        mixture_kl = kl_pm
    if DIVERGENCE != SAMPLED:
        loss = divergence

    tl.store(loss_ptr + row, tl.where(is_valid, loss, 0.0))
    stats_row = stats_ptr + row
    tl.store(stats_row + STAT_DIVERGENCE * N, tl.where(is_valid, divergence, 0.0))
    tl.store(stats_row + STAT_CONFIDENCE * N, tl.where(is_valid, confidence, 0.0))
    tl.store(stats_row + STAT_STUDENT_ENTROPY * N, tl.where(is_valid, student_entropy, 0.0))
    tl.store(stats_row + STAT_TEACHER_ENTROPY * N, tl.where(is_valid, teacher_entropy, 0.0))
    tl.store(stats_row + STAT_STUDENT_LSE * N, tl.where(is_valid, lse_s, 0.0))
    tl.store(stats_row + STAT_TEACHER_LSE * N, tl.where(is_valid, lse_u, 0.0))
    tl.store(stats_row + STAT_MIXTURE_KL * N, tl.where(is_valid, mixture_kl, 0.0))
    tl.store(stats_row + STAT_LSE_GAP * N, tl.where(is_valid, lse_gap, 0.0))
