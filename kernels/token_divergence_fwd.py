"""Forward kernel: one token per program, online log-sum-exp over the vocabulary in per-lane partials.

Math (s = student / T, u = teacher[:V] / T, p = softmax(s), q = softmax(u); wpkl/reference is the spec):
    reverse_kl  D = E_p[s - u] - lse(s) + lse(u)
    forward_kl  D = E_q[u - s] - lse(u) + lse(s)
    jsd(beta)   D = beta KL(q || m) + (1 - beta) KL(p || m),  m = (1 - beta) p + beta q
    sampled     D = log p(y) - log q(y),  L = -a log p(y) with -a = D held constant (POWER: PowerOPD's
                -a = p(y)^power - q(y)^power), -a kept in STAT_AUX for the backward;
                log q(y) may come from teacher_logprobs instead of teacher logits (TEACHER_LOGITS=False: the
                teacher row is never read) and log p(y) in D from rollout_logprobs (HAS_ROLLOUT)
For every divergence but "sampled", L = D. Per token it also writes the teacher confidence max q = 1 / z_u,
the entropies of p and q (nats), and for the backward pass both log-normalizers, their exact difference and
the divergence's auxiliary mean (raw logit units, kernels/common.py lists the statistics).

Partials (kernels/common.py defines them: exponentials in base 2 with c = log2(e) / T folded into one
multiply, logits in raw units): the vocabulary loop keeps, per lane (VEC consecutive logits of one thread,
16 bytes), the student's and teacher's running maximum m and the sums z = sum 2^((x - m) c) and
h = sum 2^((x - m) c) (x - m) rescaled to it, plus the cross sum of reverse or forward KL. No barrier or
shuffle runs inside the loop: the lanes are merged once per row (merge_lanes), and finalize_token turns the
row's partials into the outputs. jsd's second pass keeps per-lane sums of p log2(m / p), q log2(m / q), p
and q the same way (lane_jsd_step, finalize_jsd).

Addressing (kernels/common.py: aligned_split): a row is split at its first 16-byte boundary. Up to VEC - 1
peeled elements come first, then unmasked, aligned BLOCK_V blocks, then one aligned tail block masked per
16-byte chunk: every block loads 16 bytes per access whatever V and the row stride are. The edges (the peel
and the last partial chunk, < 2 VEC elements) are read with scalar loads before the loop and start lane 0's
partials. The teacher's blocks are aligned too when its rows share the student's misalignment (ALIGNED,
decided on the host; otherwise only the student's loads are 16 bytes wide).

Passes over [N, V]: one, reading each student and teacher logit once (for "sampled", two extra scalar loads
of the logits at token y). jsd makes a second pass, because log m needs both finished normalizers and is not
linear in the logits (per element 3 exp2 and 1 log2 there: p, q and one shared exp2/log2 for the mixture,
computed from log q - log p so that close distributions lose nothing).
Memory per valid token: reads V * (bytes(student) + bytes(teacher)) (twice for jsd; V * bytes(student)
for "sampled" with teacher_logprobs), writes 4 * (1 + 8) bytes. Masked tokens read nothing and write zeros.
"""

import triton
import triton.language as tl

from .common import (
    FORWARD_KL,
    JSD,
    NEG_INF,
    REVERSE_KL,
    SAMPLED,
    STAT_CONFIDENCE,
    STAT_DIVERGENCE,
    STAT_AUX,
    STAT_LSE_GAP,
    STAT_STUDENT_ENTROPY,
    STAT_STUDENT_LSE,
    STAT_TEACHER_ENTROPY,
    STAT_TEACHER_LSE,
    aligned_split,
    device_function,
    edge_columns,
    finalize_jsd,
    finalize_token,
    lane_jsd_step,
    lane_softmax_step,
    load_logits,
    into_lane0,
    merge_lanes,
    reduce_max,
    reduce_sum,
    row_offset,
    to_float,
    xlogy_term,
)


@device_function
def _block_partials(s_raw, u_raw, scale, m_s, z_s, h_s, m_u, z_u, h_u, cross,
                    DIVERGENCE: tl.constexpr, TEACHER_LOGITS: tl.constexpr):
    """Fold one [VEC, LANES] block of student and teacher logits into the per-lane partials."""
    if TEACHER_LOGITS:
        # The logit differences are taken before any scaling: exact when the logits are close.
        if DIVERGENCE == REVERSE_KL:
            diff = s_raw - u_raw
        if DIVERGENCE == FORWARD_KL:
            diff = u_raw - s_raw
    m_s, z_s, h_s, alpha_s, e_s = lane_softmax_step(s_raw, scale, m_s, z_s, h_s)
    if TEACHER_LOGITS:
        m_u, z_u, h_u, alpha_u, e_u = lane_softmax_step(u_raw, scale, m_u, z_u, h_u)
        if DIVERGENCE == REVERSE_KL:
            cross = alpha_s * cross + reduce_sum(xlogy_term(e_s, diff), 0)
        if DIVERGENCE == FORWARD_KL:
            cross = alpha_u * cross + reduce_sum(xlogy_term(e_u, diff), 0)
    return m_s, z_s, h_s, m_u, z_u, h_u, cross


@device_function
def _jsd_sums(student_ptr, teacher_ptr, student_row, teacher_row, peel, num_full, tail_start, tail_len, cols,
              edge_col, edge_mask, scale, lse_s, lse_u, lse_gap, beta, LANES: tl.constexpr, VEC: tl.constexpr,
              BLOCK_V: tl.constexpr, ALIGNED: tl.constexpr, PRECISE_LOG2: tl.constexpr):
    """jsd's second pass over a row with finished normalizers (raw units): sum p log2(m / p), sum q log2(m / q),
    sum p and sum q. Sums need no rescaling: the edges' simply add."""
    log2_1m_beta = tl.math.log2(1.0 - beta)
    log2_beta = tl.math.log2(beta)
    s_edge = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
    u_edge = to_float(tl.load(teacher_ptr + teacher_row + edge_col, mask=edge_mask, other=NEG_INF))
    m_p_sum, m_q_sum, mass_p, mass_q = lane_jsd_step(s_edge, u_edge, scale, lse_s, lse_u, lse_gap, log2_1m_beta,
                                                     log2_beta, PRECISE_LOG2)
    m_p_sum = into_lane0(reduce_sum(m_p_sum, 0), LANES, 0.0)  # sum p log2(m / p)
    m_q_sum = into_lane0(reduce_sum(m_q_sum, 0), LANES, 0.0)  # sum q log2(m / q)
    mass_p = into_lane0(reduce_sum(mass_p, 0), LANES, 0.0)
    mass_q = into_lane0(reduce_sum(mass_q, 0), LANES, 0.0)
    for block in range(0, num_full):
        s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, peel + block * BLOCK_V,
                                   cols, None, VEC, True, ALIGNED, False)
        d_mp, d_mq, d_p, d_q = lane_jsd_step(s_raw, u_raw, scale, lse_s, lse_u, lse_gap, log2_1m_beta,
                                             log2_beta, PRECISE_LOG2)
        m_p_sum += d_mp
        m_q_sum += d_mq
        mass_p += d_p
        mass_q += d_q
    if tail_len > 0:
        s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, tail_start, cols,
                                   cols < tail_len, VEC, True, ALIGNED, True)
        d_mp, d_mq, d_p, d_q = lane_jsd_step(s_raw, u_raw, scale, lse_s, lse_u, lse_gap, log2_1m_beta,
                                             log2_beta, PRECISE_LOG2)
        m_p_sum += d_mp
        m_q_sum += d_mq
        mass_p += d_p
        mass_q += d_q
    return reduce_sum(m_p_sum, 0), reduce_sum(m_q_sum, 0), reduce_sum(mass_p, 0), reduce_sum(mass_q, 0)


@triton.jit
def token_divergence_fwd_kernel(
    # pointers (16-byte aligned: the host passes the aligned base and the element shift below)
    student_ptr,  # [B, T, V] logits, last dim contiguous
    teacher_ptr,  # [B, T, V_t >= V] logits, last dim contiguous (unread unless TEACHER_LOGITS)
    valid_ptr,  # [N] int8: 0 = token ignored
    tokens_ptr,  # [N] int64 sampled tokens (SAMPLED only)
    teacher_logprobs_ptr,  # [N] fp32 log q(y) (SAMPLED without TEACHER_LOGITS only)
    rollout_ptr,  # [N] fp32 log p(y) under the sampling policy (HAS_ROLLOUT only)
    loss_ptr,  # [N] fp32 out: per-token loss L
    stats_ptr,  # [NUM_STATS, N] fp32 out
    # element offsets of the tensors' first elements from their pointers (< VEC)
    student_shift,
    teacher_shift,
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
    scale,  # log2(e) / T
    inv_temperature,
    beta,
    power,  # "sampled" with POWER: PowerOPD's exponent
    DIVERGENCE: tl.constexpr,
    TEACHER_LOGITS: tl.constexpr,  # False: "sampled" with log q(y) given, the teacher row is never read
    HAS_ROLLOUT: tl.constexpr,
    POWER: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16 bytes of the wider logits dtype
    ALIGNED: tl.constexpr,  # the teacher's rows share the student's misalignment: its blocks are aligned too
    PRECISE_LOG2: tl.constexpr,  # fp32 student: jsd's mixture log2 is the precise one (kernels/common.py)
):
    beta = tl.cast(beta, tl.float32)  # as on the GPU (the interpreter would keep a Python float's precision)
    row = tl.program_id(0)
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    teacher_row = teacher_shift + row_offset(row, T, stride_teacher_b, stride_teacher_t)
    is_valid = tl.load(valid_ptr + row) != 0
    # A masked token has no columns: the loops run zero times, nothing is read, and its outputs are zeroed.
    row_v = tl.where(is_valid, V, 0)
    peel, num_full, tail_start, tail_len = aligned_split(student_row, row_v, VEC, BLOCK_V)
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, VEC)[:, None] + tl.arange(0, LANES)[None, :] * VEC  # [VEC, LANES]: a lane per column

    # The edges (the peel and the last partial 16-byte chunk, scalar loads) start lane 0's partials.
    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, row_v, VEC)
    s_edge = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
    if TEACHER_LOGITS:
        u_edge = to_float(tl.load(teacher_ptr + teacher_row + edge_col, mask=edge_mask, other=NEG_INF))
    else:
        u_edge = s_edge  # unused
    init = tl.full([1], NEG_INF, tl.float32)
    zero = tl.full([1], 0, tl.float32)
    m_s, z_s, h_s, m_u, z_u, h_u, cross = _block_partials(s_edge, u_edge, scale, init, zero, zero, init, zero, zero,
                                                          zero, DIVERGENCE, TEACHER_LOGITS)
    m_s = into_lane0(reduce_max(m_s, 0), LANES, NEG_INF)
    m_u = into_lane0(reduce_max(m_u, 0), LANES, NEG_INF)
    z_s = into_lane0(reduce_sum(z_s, 0), LANES, 0.0)
    z_u = into_lane0(reduce_sum(z_u, 0), LANES, 0.0)
    h_s = into_lane0(reduce_sum(h_s, 0), LANES, 0.0)
    h_u = into_lane0(reduce_sum(h_u, 0), LANES, 0.0)
    cross = into_lane0(reduce_sum(cross, 0), LANES, 0.0)
    # The vocabulary loop: aligned, unmasked blocks.
    for block in range(0, num_full):
        s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, peel + block * BLOCK_V, cols,
                                   None, VEC, TEACHER_LOGITS, ALIGNED, False)
        m_s, z_s, h_s, m_u, z_u, h_u, cross = _block_partials(s_raw, u_raw, scale, m_s, z_s, h_s, m_u, z_u, h_u,
                                                              cross, DIVERGENCE, TEACHER_LOGITS)
    # The tail block: aligned too, masked per 16-byte chunk.
    if tail_len > 0:
        s_raw, u_raw = load_logits(student_ptr, teacher_ptr, student_row, teacher_row, tail_start, cols,
                                   cols < tail_len, VEC, TEACHER_LOGITS, ALIGNED, True)
        m_s, z_s, h_s, m_u, z_u, h_u, cross = _block_partials(s_raw, u_raw, scale, m_s, z_s, h_s, m_u, z_u, h_u,
                                                              cross, DIVERGENCE, TEACHER_LOGITS)

    # Once per row: merge the lanes (the only cross-thread reductions), then finalize.
    m_s, z_s, h_s, factor_s = merge_lanes(m_s, z_s, h_s, scale)
    if TEACHER_LOGITS:
        m_u, z_u, h_u, factor_u = merge_lanes(m_u, z_u, h_u, scale)
    if DIVERGENCE == REVERSE_KL:
        cross = reduce_sum(factor_s * cross, 0)
    if DIVERGENCE == FORWARD_KL:
        cross = reduce_sum(factor_u * cross, 0)
    s_y = 0.0
    u_y = 0.0
    log_q_y = 0.0
    behaviour = 0.0
    if DIVERGENCE == SAMPLED:
        token = tl.load(tokens_ptr + row, mask=is_valid, other=0)
        # An out-of-range token (the value checks report it; on CUDA they run deferred) reads nothing: its
        # row's loss is NaN, never a number read from another row or past the end of the buffer.
        in_range = (token >= 0) & (token < V)
        s_y = to_float(tl.load(student_ptr + student_row + token, mask=is_valid & in_range, other=0.0))
        s_y = tl.where(in_range, s_y, float("nan"))  # a masked row loads token 0: in range
        if TEACHER_LOGITS:
            u_y = to_float(tl.load(teacher_ptr + teacher_row + token, mask=is_valid & in_range, other=0.0))
        else:
            log_q_y = tl.load(teacher_logprobs_ptr + row, mask=is_valid, other=0.0)
        if HAS_ROLLOUT:
            behaviour = tl.load(rollout_ptr + row, mask=is_valid, other=0.0)
    loss, divergence, confidence, student_entropy, teacher_entropy, lse_s, lse_u, lse_gap, aux = finalize_token(
        scale, inv_temperature, m_s, z_s, h_s, m_u, z_u, h_u, cross, s_y, u_y, log_q_y, behaviour, power,
        DIVERGENCE, TEACHER_LOGITS, HAS_ROLLOUT, POWER)

    if DIVERGENCE == JSD:
        # Second pass: log m needs both finished normalizers.
        m_p_sum, m_q_sum, mass_p, mass_q = _jsd_sums(student_ptr, teacher_ptr, student_row, teacher_row, peel,
                                                     num_full, tail_start, tail_len, cols, edge_col, edge_mask, scale,
                                                     lse_s, lse_u, lse_gap, beta, LANES, VEC, BLOCK_V, ALIGNED,
                                                     PRECISE_LOG2)
        divergence, aux = finalize_jsd(beta, m_p_sum, m_q_sum, mass_p, mass_q)
        loss = divergence

    tl.store(loss_ptr + row, tl.where(is_valid, loss, 0.0))
    stats_row = stats_ptr + row
    tl.store(stats_row + STAT_DIVERGENCE * N, tl.where(is_valid, divergence, 0.0))
    tl.store(stats_row + STAT_CONFIDENCE * N, tl.where(is_valid, confidence, 0.0))
    tl.store(stats_row + STAT_STUDENT_ENTROPY * N, tl.where(is_valid, student_entropy, 0.0))
    tl.store(stats_row + STAT_TEACHER_ENTROPY * N, tl.where(is_valid, teacher_entropy, 0.0))
    tl.store(stats_row + STAT_STUDENT_LSE * N, tl.where(is_valid, lse_s, 0.0))
    tl.store(stats_row + STAT_TEACHER_LSE * N, tl.where(is_valid, lse_u, 0.0))
    tl.store(stats_row + STAT_AUX * N, tl.where(is_valid, aux, 0.0))
    tl.store(stats_row + STAT_LSE_GAP * N, tl.where(is_valid, lse_gap, 0.0))


@triton.jit
def token_jsd_partials_kernel(
    student_ptr,  # [B, T, V_local] this rank's slice of the logits (aligned base, as above)
    teacher_ptr,  # [B, T, V_t] the teacher's slice
    valid_ptr,  # [N] int8
    stats_ptr,  # [NUM_STATS, N] fp32: the whole vocabulary's lse_s, lse_u and lse_gap (wpkl/parallel/merge.py)
    partials_ptr,  # [4, N] fp32 out: the slice's sum p log2(m / p), sum q log2(m / q), sum p, sum q
    student_shift,
    teacher_shift,
    stride_student_b,
    stride_student_t,
    stride_teacher_b,
    stride_teacher_t,
    T,
    V,
    N,
    scale,  # log2(e) / T
    beta,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISE_LOG2: tl.constexpr,
):
    """jsd on a vocabulary slice (wpkl/parallel/merge.py: ShardedTritonPass): its second pass with the whole vocabulary's
    normalizers. The four sums are additive over the vocabulary, so the group's sum of every rank's, finalized
    as finalize_jsd does, is the one-device jsd. Reads V (bytes(student) + bytes(teacher)) per valid token."""
    beta = tl.cast(beta, tl.float32)
    row = tl.program_id(0)
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    teacher_row = teacher_shift + row_offset(row, T, stride_teacher_b, stride_teacher_t)
    is_valid = tl.load(valid_ptr + row) != 0
    row_v = tl.where(is_valid, V, 0)
    peel, num_full, tail_start, tail_len = aligned_split(student_row, row_v, VEC, BLOCK_V)
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, VEC)[:, None] + tl.arange(0, LANES)[None, :] * VEC
    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, row_v, VEC)
    lse_s = tl.load(stats_ptr + STAT_STUDENT_LSE * N + row)
    lse_u = tl.load(stats_ptr + STAT_TEACHER_LSE * N + row)
    lse_gap = tl.load(stats_ptr + STAT_LSE_GAP * N + row)
    m_p_sum, m_q_sum, mass_p, mass_q = _jsd_sums(student_ptr, teacher_ptr, student_row, teacher_row, peel, num_full,
                                                 tail_start, tail_len, cols, edge_col, edge_mask, scale, lse_s, lse_u,
                                                 lse_gap, beta, LANES, VEC, BLOCK_V, ALIGNED, PRECISE_LOG2)
    out = partials_ptr + row
    tl.store(out, tl.where(is_valid, m_p_sum, 0.0))
    tl.store(out + N, tl.where(is_valid, m_q_sum, 0.0))
    tl.store(out + 2 * N, tl.where(is_valid, mass_p, 0.0))
    tl.store(out + 3 * N, tl.where(is_valid, mass_q, 0.0))
