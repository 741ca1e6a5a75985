"""Several teachers, one read of the student: the forward kernel (here) and the backward (token_mixture_bwd.py)
of reverse and forward KL and jsd against K teachers' logits (wpkl.multi_teacher_loss with dense mixing), one token per program as in
token_divergence_fwd.py / token_divergence_bwd.py, whose math and numerics they share (kernels/common.py).

Forward: per token, the student's partials (m_s, z_s, h_s) once and each teacher k's (m_k, z_k, h_k, cross_k) in
[K, LANES] rows; the teachers' blocks are [K, VEC, LANES] (each teacher's 16-byte vectors, the student's block
broadcast over K), so that every block of the student row is loaded once for all K teachers. finalize_token runs
once on [K] rows. Out: per teacher k its loss L_k and the statistics ([K, N], [K, NUM_STATS, N], as the
single-teacher kernel writes them; the student's own statistics repeated per teacher), so that the mixture
and the autograd of wpkl/engine/weigh.py: ``mix_terms`` give each teacher its d loss / d L_k.
jsd makes a second pass, as the single-teacher kernel does (log m_k needs teacher k's finished normalizers):
per teacher the sums of p log2(m_k / p), q_k log2(m_k / q_k) and q_k in [K, LANES] rows, the student's mass once
(``_jsd_partials``), finalize_jsd on [K] rows; two teachers per pass (MAX_JSD_TEACHERS, for the registers).
Backward, by linearity, with c_k = d loss / d L_k of the token:
    reverse_kl  d loss / d s_j = p_j / T^2 * sum_k c_k ((s_j - u_kj) - E_p[s - u_k])
    forward_kl  d loss / d s_j = (p_j sum_k c_k - sum_k c_k q_kj) / T
    jsd         d loss / d s_j = -(1 - beta) ln 2 / T * p_j sum_k c_k (log2(p_j / m_kj) - KL2(p || m_k))
Each teacher k comes as its own pointer (16-byte aligned: the host passes the aligned base), the element shift of
its first element from there and its two leading strides: four teachers' slots (KB = K rounded up to a power of
two; unused slots repeat teacher 0 and are never read), turned once per program into [KB] element offsets from
teacher 0's pointer, so that no table travels to the device (nothing is copied from the host). ``valid`` is
[K, N]: teacher k reads token i's row only where valid[k, i] (its mixing
weight is nonzero there); a token no teacher sees reads nothing and writes zeros, unless ``rows`` [N] asks for
the student's terms there (top-k teachers beside these: wpkl/backends/triton_logits_topk.py): then the student
row alone is read, and its lse and entropy are written in teacher 0's slot.
Memory per token: reads V * (bytes(student) + sum of the seeing teachers' bytes) forward (twice for jsd) and
backward (the single-teacher kernels read the student row K times), writes V * bytes(student) backward.
"""

import triton
import triton.language as tl

from .common import NUM_STATS as _NUM_STATS
from .common import (
    FORWARD_KL,
    JSD,
    NEG_INF,
    REVERSE_KL,
    STAT_AUX,
    STAT_CONFIDENCE,
    STAT_DIVERGENCE,
    STAT_LSE_GAP,
    STAT_STUDENT_ENTROPY,
    STAT_STUDENT_LSE,
    STAT_TEACHER_ENTROPY,
    STAT_TEACHER_LSE,
    aligned_split,
    assume_multiple,
    device_function,
    edge_columns,
    exp2_approx,
    finalize_jsd,
    finalize_token,
    into_lane0,
    lane_softmax_step,
    merge_lanes,
    mixture_log2_ratios,
    mixture_r,
    reduce_max,
    reduce_sum,
    row_offset,
    to_float,
    xlogy_term,
)

STATS: tl.constexpr = tl.constexpr(_NUM_STATS)  # rows of the statistics per teacher


@device_function
def _pick(ks, a, b, c, d):
    """[KB] of the four teachers' scalars (slot k: the k-th)."""
    return tl.where(ks == 0, a, tl.where(ks == 1, b, tl.where(ks == 2, c, d)))


@device_function
def _teachers(t0, t1, t2, t3, f0, f1, f2, f3, b0, b1, b2, b3, s0, s1, s2, s3, row, T, KB: tl.constexpr):
    """[KB] element offsets of token ``row``'s row in each teacher from teacher 0's pointer: teacher k's pointer
    t_k, shift f_k, strides b_k and s_k. The loads then address one scalar pointer (t0) with [KB] offsets, whose
    16-byte alignment the compiler sees (a [KB] vector of pointers it does not: 2-byte loads and shuffles)."""
    ks = tl.arange(0, KB)
    ES: tl.constexpr = t0.dtype.element_ty.primitive_bitwidth // 8
    base = t0.to(tl.int64)
    # whole elements apart (the host checks it: wpkl/backends/triton_mixture.py, ``locatable``)
    apart = _pick(ks, 0, (t1.to(tl.int64) - base) // ES, (t2.to(tl.int64) - base) // ES,
                  (t3.to(tl.int64) - base) // ES)
    first = apart + _pick(ks, f0, f1, f2, f3).to(tl.int64)
    stride_b = _pick(ks, b0, b1, b2, b3).to(tl.int64)
    return first + row_offset(row, T, stride_b, _pick(ks, s0, s1, s2, s3).to(tl.int64))


@device_function
def _load_teachers(teacher_ptr, rows, start, cols, on, in_block, other, VEC: tl.constexpr, ALIGNED: tl.constexpr,
                   MASKED: tl.constexpr):
    """The [KB, *cols] teachers' logits at columns start + cols as fp32 (``other`` where a teacher does not see
    the token, or, if MASKED, outside ``in_block``); 16 bytes per access where ALIGNED."""
    starts = rows + start
    if ALIGNED:
        starts = assume_multiple(starts, VEC)
    if len(cols.shape) == 1:
        pointers = teacher_ptr + (starts[:, None] + cols[None, :])
        mask = on[:, None]
        if MASKED:
            mask = mask & in_block[None, :]
    else:
        pointers = teacher_ptr + (starts[:, None, None] + cols[None, :, :])
        mask = on[:, None, None]
        if MASKED:
            mask = mask & in_block[None, :, :]
    return to_float(tl.load(pointers, mask=mask, other=other))


@device_function
def _partials(s, u, scale, m_s, z_s, h_s, m_u, z_u, h_u, cross, DIVERGENCE: tl.constexpr):
    """Fold a [VEC, LANES] student block and its [KB, VEC, LANES] teachers' block into the partials."""
    m_s, z_s, h_s, alpha_s, e_s = lane_softmax_step(s, scale, m_s, z_s, h_s)
    m_u, z_u, h_u, alpha_u, e_u = lane_softmax_step(u, scale, m_u, z_u, h_u, 1)
    if DIVERGENCE == REVERSE_KL:
        cross = alpha_s[None, :] * cross + reduce_sum(xlogy_term(e_s[None, :, :], s[None, :, :] - u), 1)
    if DIVERGENCE == FORWARD_KL:
        cross = alpha_u * cross + reduce_sum(xlogy_term(e_u, u - s[None, :, :]), 1)
    return m_s, z_s, h_s, m_u, z_u, h_u, cross


@device_function
def _jsd_partials(s, u, scale, lse_s, lse_u, lse_gap, log2_1m_beta, log2_beta, PRECISE_LOG2: tl.constexpr):
    """jsd's second pass over a student block ``s`` and its [KB, *s.shape] teachers' block ``u`` (``lse_u`` and
    ``lse_gap`` expanded to u's rank): per teacher the sums of p log2(m_k / p) and q_k log2(m_k / q_k) and the
    mass of q_k over the block's vector axis ([KB, ...]), and the student's mass (kernels/common.py:
    lane_jsd_step, per teacher)."""
    log2_m_p, log2_m_q = mixture_log2_ratios(mixture_r(tl.expand_dims(s, 0), u, scale, lse_gap), log2_1m_beta,
                                             log2_beta, PRECISE_LOG2)
    p = exp2_approx((s - lse_s) * scale)
    q = exp2_approx((u - lse_u) * scale)
    return (reduce_sum(xlogy_term(tl.expand_dims(p, 0), log2_m_p), 1), reduce_sum(xlogy_term(q, log2_m_q), 1),
            reduce_sum(p, 0), reduce_sum(q, 1))


@device_function
def _jsd_sums(student_ptr, teacher_ptr, rows, student_row, peel, num_full, tail_start, tail_len, cols, edge_col,
              edge_mask, on, lane0, scale, lse_s, lse_u, lse_gap, beta, LANES: tl.constexpr, VEC: tl.constexpr,
              ALIGNED: tl.constexpr, BLOCK_V: tl.constexpr, PRECISE_LOG2: tl.constexpr):
    """jsd's second pass over a row with finished normalizers (raw units; ``lse_u``, ``lse_gap`` [KB]): per
    teacher sum p log2(m_k / p), sum q_k log2(m_k / q_k) and sum q_k ([KB] each), and the student's sum p."""
    log2_1m_beta = tl.math.log2(1.0 - beta)
    log2_beta = tl.math.log2(beta)
    s_edge = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
    u_edge = _load_teachers(teacher_ptr, rows, 0, edge_col, on, edge_mask, NEG_INF, VEC, False, True)
    lse_u2, lse_gap2 = lse_u[:, None, None], lse_gap[:, None, None]
    d_mp, d_mq, d_p, d_q = _jsd_partials(s_edge, u_edge, scale, lse_s, lse_u2, lse_gap2, log2_1m_beta, log2_beta,
                                         PRECISE_LOG2)
    m_p_sum = tl.where(lane0, d_mp, 0.0)  # [KB, 1] into lane 0 of [KB, LANES]: sum p log2(m_k / p)
    m_q_sum = tl.where(lane0, d_mq, 0.0)  # sum q_k log2(m_k / q_k)
    mass_q = tl.where(lane0, d_q, 0.0)
    mass_p = into_lane0(d_p, LANES, 0.0)  # [LANES]
    if tail_len > 0:
        in_tail = cols < tail_len
        s_tail = to_float(tl.load(student_ptr + assume_multiple(student_row + tail_start, VEC) + cols,
                                  mask=in_tail, other=NEG_INF))
        u_tail = _load_teachers(teacher_ptr, rows, tail_start, cols, on, in_tail, NEG_INF, VEC, ALIGNED, True)
        t_mp, t_mq, t_p, t_q = _jsd_partials(s_tail, u_tail, scale, lse_s, lse_u2, lse_gap2, log2_1m_beta,
                                             log2_beta, PRECISE_LOG2)
        m_p_sum += t_mp
        m_q_sum += t_mq
        mass_p += t_p
        mass_q += t_q
    for block in range(0, num_full):
        start = peel + block * BLOCK_V
        s_block = to_float(tl.load(student_ptr + assume_multiple(student_row + start, VEC) + cols))
        u_block = _load_teachers(teacher_ptr, rows, start, cols, on, None, NEG_INF, VEC, ALIGNED, False)
        e_mp, e_mq, e_p, e_q = _jsd_partials(s_block, u_block, scale, lse_s, lse_u2, lse_gap2, log2_1m_beta,
                                             log2_beta, PRECISE_LOG2)
        m_p_sum += e_mp
        m_q_sum += e_mq
        mass_p += e_p
        mass_q += e_q
    return reduce_sum(m_p_sum, 1), reduce_sum(m_q_sum, 1), reduce_sum(mass_p, 0), reduce_sum(mass_q, 1)


@triton.jit
def token_mixture_fwd_kernel(
    student_ptr,  # [B, T, V] logits (16-byte aligned base, see student_shift)
    teacher0_ptr,  # [B, T, V_t >= V] logits of each teacher (16-byte aligned bases, see the shifts)
    teacher1_ptr,
    teacher2_ptr,
    teacher3_ptr,
    valid_ptr,  # [K, N] int8: teacher k sees token i
    rows_ptr,  # [N] int8: the student's terms are needed (in teacher 0's slot) even where no teacher sees it
    loss_ptr,  # [K, N] fp32 out
    stats_ptr,  # [K, NUM_STATS, N] fp32 out
    student_shift,
    stride_student_b,
    stride_student_t,
    shift0, shift1, shift2, shift3,  # the teachers' element shifts (< VEC)
    stride_b0, stride_b1, stride_b2, stride_b3,
    stride_t0, stride_t1, stride_t2, stride_t3,
    T,
    V,
    N,
    K,
    scale,  # log2(e) / T
    inv_temperature,
    beta,  # jsd's
    DIVERGENCE: tl.constexpr,  # REVERSE_KL, FORWARD_KL or JSD
    KB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,  # every teacher's rows share the student's misalignment
    PRECISE_LOG2: tl.constexpr,  # jsd with an fp32 student: the mixture's precise log2 (kernels/common.py)
):
    row = tl.program_id(0)
    ks = tl.arange(0, KB)
    in_k = ks < K
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    teacher_ptr = teacher0_ptr
    rows = _teachers(teacher0_ptr, teacher1_ptr, teacher2_ptr, teacher3_ptr, shift0, shift1, shift2, shift3,
                                  stride_b0, stride_b1, stride_b2, stride_b3, stride_t0, stride_t1, stride_t2, stride_t3,
                                  row, T, KB)
    on = tl.load(valid_ptr + ks.to(tl.int64) * N + row, mask=in_k, other=0) != 0  # [KB]
    need = (tl.load(rows_ptr + row).to(tl.int32) + tl.zeros([KB], tl.int32)) != 0  # ([KB]: the interpreter's masks)
    student_on = on | ((ks == 0) & need)  # the slots holding the student's terms
    is_valid = reduce_max(student_on.to(tl.int32), 0) != 0
    row_v = tl.where(is_valid, V, 0)  # a token neither a teacher nor the student's terms need has no columns
    peel, num_full, tail_start, tail_len = aligned_split(student_row, row_v, VEC, BLOCK_V)
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, VEC)[:, None] + tl.arange(0, LANES)[None, :] * VEC  # [VEC, LANES]
    lane0 = tl.arange(0, LANES)[None, :] == 0

    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, row_v, VEC)
    s_edge = to_float(tl.load(student_ptr + student_row + edge_col, mask=edge_mask, other=NEG_INF))
    u_edge = _load_teachers(teacher_ptr, rows, 0, edge_col, on, edge_mask, NEG_INF, VEC, False, True)
    init = tl.full([1], NEG_INF, tl.float32)
    zero = tl.full([1], 0, tl.float32)
    k_init = tl.full([KB, 1], NEG_INF, tl.float32)
    k_zero = tl.full([KB, 1], 0, tl.float32)
    m_s, z_s, h_s, m_u, z_u, h_u, cross = _partials(s_edge, u_edge, scale, init, zero, zero, k_init, k_zero, k_zero, k_zero,
                                                    DIVERGENCE)
    m_s = into_lane0(reduce_max(m_s, 0), LANES, NEG_INF)
    z_s = into_lane0(reduce_sum(z_s, 0), LANES, 0.0)
    h_s = into_lane0(reduce_sum(h_s, 0), LANES, 0.0)
    m_u = tl.where(lane0, m_u, NEG_INF)  # [KB, 1] into lane 0 of [KB, LANES]
    z_u = tl.where(lane0, z_u, 0.0)
    h_u = tl.where(lane0, h_u, 0.0)
    cross = tl.where(lane0, cross, 0.0)
    # The tail block before the loop (the order of the blocks does not matter to the partials): nothing of the
    # row's addressing then lives past the loop, which keeps every specialization free of spills.
    if tail_len > 0:
        in_tail = cols < tail_len
        s = to_float(tl.load(student_ptr + assume_multiple(student_row + tail_start, VEC) + cols, mask=in_tail,
                             other=NEG_INF))
        u = _load_teachers(teacher_ptr, rows, tail_start, cols, on, in_tail, NEG_INF, VEC, ALIGNED, True)
        m_s, z_s, h_s, m_u, z_u, h_u, cross = _partials(s, u, scale, m_s, z_s, h_s, m_u, z_u, h_u, cross,
                                                        DIVERGENCE)
    for block in range(0, num_full):
        start = peel + block * BLOCK_V
        s = to_float(tl.load(student_ptr + assume_multiple(student_row + start, VEC) + cols))
        u = _load_teachers(teacher_ptr, rows, start, cols, on, None, NEG_INF, VEC, ALIGNED, False)
        m_s, z_s, h_s, m_u, z_u, h_u, cross = _partials(s, u, scale, m_s, z_s, h_s, m_u, z_u, h_u, cross,
                                                        DIVERGENCE)

    m_s, z_s, h_s, factor_s = merge_lanes(m_s, z_s, h_s, scale)
    m_u, z_u, h_u, factor_u = merge_lanes(m_u, z_u, h_u, scale, 1)
    if DIVERGENCE == REVERSE_KL:
        cross = reduce_sum(factor_s[None, :] * cross, 1)
    if DIVERGENCE == FORWARD_KL:
        cross = reduce_sum(factor_u * cross, 1)
    loss, divergence, confidence, student_entropy, teacher_entropy, lse_s, lse_u, lse_gap, aux = finalize_token(
        scale, inv_temperature, m_s, z_s, h_s, m_u, z_u, h_u, cross, 0.0, 0.0, 0.0, 0.0, 0.0,
        DIVERGENCE, True, False, False)
    if DIVERGENCE == JSD:
        # Second pass (as token_divergence_fwd.py's): log m_k needs both finished normalizers of each teacher.
        beta = tl.cast(beta, tl.float32)
        m_p_sum, m_q_sum, mass_p, mass_q = _jsd_sums(student_ptr, teacher_ptr, rows, student_row, peel, num_full,
                                                     tail_start, tail_len, cols, edge_col, edge_mask, on, lane0,
                                                     scale, lse_s, lse_u, lse_gap, beta, LANES, VEC, ALIGNED,
                                                     BLOCK_V, PRECISE_LOG2)
        divergence, aux = finalize_jsd(beta, m_p_sum, m_q_sum, mass_p, mass_q)
        loss = divergence

    k64 = ks.to(tl.int64)
    tl.store(loss_ptr + k64 * N + row, tl.where(on, loss, 0.0), mask=in_k)
    stats = stats_ptr + k64 * (STATS * N) + row
    tl.store(stats + STAT_DIVERGENCE * N, tl.where(on, divergence, 0.0), mask=in_k)
    tl.store(stats + STAT_CONFIDENCE * N, tl.where(on, confidence, 0.0), mask=in_k)
    tl.store(stats + STAT_STUDENT_ENTROPY * N, tl.where(student_on, student_entropy, 0.0), mask=in_k)
    tl.store(stats + STAT_TEACHER_ENTROPY * N, tl.where(on, teacher_entropy, 0.0), mask=in_k)
    tl.store(stats + STAT_STUDENT_LSE * N, tl.where(student_on, lse_s, 0.0), mask=in_k)
    tl.store(stats + STAT_TEACHER_LSE * N, tl.where(on, lse_u, 0.0), mask=in_k)
    tl.store(stats + STAT_AUX * N, tl.where(on, aux, 0.0), mask=in_k)
    tl.store(stats + STAT_LSE_GAP * N, tl.where(on, lse_gap, 0.0), mask=in_k)


@triton.jit
def token_mixture_jsd_partials_kernel(
    student_ptr,  # [B, T, V_local] this rank's slice (aligned bases and shifts as above)
    teacher0_ptr,
    teacher1_ptr,
    teacher2_ptr,
    teacher3_ptr,
    valid_ptr,  # [K, N] int8
    stats_ptr,  # [K, NUM_STATS, N] fp32: the whole vocabulary's lse_s, lse_u and lse_gap (wpkl/parallel/merge.py)
    partials_ptr,  # [K, 4, N] fp32 out: the slice's sum p log2(m_k / p), sum q_k log2(m_k / q_k), sum p, sum q_k
    student_shift,
    stride_student_b,
    stride_student_t,
    shift0, shift1, shift2, shift3,
    stride_b0, stride_b1, stride_b2, stride_b3,
    stride_t0, stride_t1, stride_t2, stride_t3,
    T,
    V,
    N,
    K,
    scale,  # log2(e) / T
    beta,
    KB: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGNED: tl.constexpr,
    PRECISE_LOG2: tl.constexpr,
):
    """jsd teachers on a vocabulary slice (wpkl/parallel/shard_mixture.py): the second pass with the whole
    vocabulary's normalizers, the student's slice read once for the K teachers, the four sums per teacher
    additive over the vocabulary (the group's sum, finalized as finalize_jsd does, is the one-device jsd)."""
    beta = tl.cast(beta, tl.float32)
    row = tl.program_id(0)
    ks = tl.arange(0, KB)
    in_k = ks < K
    student_row = student_shift + row_offset(row, T, stride_student_b, stride_student_t)
    rows = _teachers(teacher0_ptr, teacher1_ptr, teacher2_ptr, teacher3_ptr, shift0, shift1, shift2, shift3,
                     stride_b0, stride_b1, stride_b2, stride_b3, stride_t0, stride_t1, stride_t2, stride_t3, row, T, KB)
    on = tl.load(valid_ptr + ks.to(tl.int64) * N + row, mask=in_k, other=0) != 0
    is_valid = reduce_max(on.to(tl.int32), 0) != 0
    row_v = tl.where(is_valid, V, 0)
    peel, num_full, tail_start, tail_len = aligned_split(student_row, row_v, VEC, BLOCK_V)
    LANES: tl.constexpr = BLOCK_V // VEC
    cols = tl.arange(0, VEC)[:, None] + tl.arange(0, LANES)[None, :] * VEC
    lane0 = tl.arange(0, LANES)[None, :] == 0
    edge_col, edge_mask = edge_columns(peel, tail_start + tail_len, row_v, VEC)
    stats = stats_ptr + ks.to(tl.int64) * (STATS * N) + row
    lse_s = reduce_max(tl.load(stats + STAT_STUDENT_LSE * N, mask=on, other=NEG_INF), 0)  # the same in every slot
    lse_u = tl.load(stats + STAT_TEACHER_LSE * N, mask=on, other=0.0)
    lse_gap = tl.load(stats + STAT_LSE_GAP * N, mask=on, other=0.0)
    m_p_sum, m_q_sum, mass_p, mass_q = _jsd_sums(student_ptr, teacher0_ptr, rows, student_row, peel, num_full,
                                                 tail_start, tail_len, cols, edge_col, edge_mask, on, lane0, scale,
                                                 lse_s, lse_u, lse_gap, beta, LANES, VEC, ALIGNED, BLOCK_V,
                                                 PRECISE_LOG2)
    out = partials_ptr + ks.to(tl.int64) * (4 * N) + row
    tl.store(out, tl.where(on, m_p_sum, 0.0), mask=in_k)
    tl.store(out + N, tl.where(on, m_q_sum, 0.0), mask=in_k)
    tl.store(out + 2 * N, tl.where(on, mass_p, 0.0), mask=in_k)
    tl.store(out + 3 * N, tl.where(on, mass_q, 0.0), mask=in_k)
