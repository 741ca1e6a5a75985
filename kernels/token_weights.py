"""Weights, reduction and value checks over [N] per-token vectors: one program, four passes, no atomics.

Implements wpkl/reference/weights.py (``compute_weights``, the specification) and wpkl/reference/reduction.py (``reduce_loss``) for
the Triton path, so that a forward with any weighting runs two kernels (the vocabulary pass, then this one) and
the backward one (the vocabulary pass, reading the per-token coefficient this kernel writes).

Tokens are in the flattened [B, T] (or packed [N]) order; sequences are segments: rows of T tokens (SEGMENTS=0),
runs starting at each position 0 of packed input (1), or the whole input (2). Per token i, with D_i, c_i, L_i
from the vocabulary pass:

    pos_i  given, or the number of valid tokens before i in its sequence
    n_b    valid tokens of the sequence;  A_i, S_b  the exclusive prefix / total of |D| over its valid tokens
    w_i  = valid_i * user_i * f(pos_i, n_b) * c_i^a * |D_i|^d * (1 + gamma (1 - A_i / max(S_b, eps)))
    w_i  = min(w_i, w_max)               (when given)
    normalize: w_i *= n_valid / sum(w)   (all 0 when sum(w) = 0)
    loss = sum_i w_i L_i / max(n_valid, 1)  (mean; / num_items_in_batch, 1 when nothing is valid)
         | sum_i w_i L_i (sum) | sum_i w_i L_i / n_b(i) / max(#sequences with a valid token, 1) (seq_mean)
         | w_i L_i per token (none)
    coef_i = d loss / d L_i  (for the backward kernel)

Passes over [N] in blocks of BLOCK, carrying running values across blocks (segmented scans with
``tl.associative_scan``):
    1  positions, the exclusive prefixes (valid count, |D|), each sequence's id and its totals (written by the
       sequence's last token: one writer per sequence);
    2  the unnormalized weights; sums for normalization and the reduction; value checks;
    3  (after the sums) the final weights, coefficients, and the loss (per token for "none").
Bytes per token: about 60 read + 16 written per pass-relevant vector, against V * 2 bytes per token in the
vocabulary pass: negligible. Every sum runs in a fixed order: bitwise deterministic.

Value checks (flags[k] = 1 when an input is bad on a valid token; the wrapper raises, without a host sync on
CUDA): see CHECK_* in wpkl/weights_kernel.py's messages (the order of ``CHECK_MESSAGES``).
"""

import triton
import triton.language as tl

# position schedules (POSITION constexpr)
POS_NONE = tl.constexpr(0)
POS_EXP = tl.constexpr(1)
POS_POWER = tl.constexpr(2)
POS_TABLE = tl.constexpr(3)
POS_WINDOW = tl.constexpr(4)
POS_SIGMOID = tl.constexpr(5)
# reductions (REDUCTION constexpr)
RED_MEAN = tl.constexpr(0)
RED_SUM = tl.constexpr(1)
RED_SEQ_MEAN = tl.constexpr(2)
RED_NONE = tl.constexpr(3)
NUM_CHECKS = 8


@triton.jit
def _segmented_sum(f1, v1, f2, v2):
    """Combine for an inclusive segmented scan: a set flag starts a new segment."""
    return f1 | f2, tl.where(f2 != 0, v2, v1 + v2)


@triton.jit
def _pow(x, exponent):
    """x ** exponent for x >= 0 (0 ** e = 0 for e > 0, inf and NaN propagate)."""
    return tl.math.exp2(exponent * tl.math.log2(x))


@triton.jit
def token_weights_kernel(
    # per-token inputs [N]
    valid_ptr,  # int8
    divergence_ptr,  # fp32 D_i (0 where invalid)
    confidence_ptr,  # fp32 c_i
    loss_ptr,  # fp32 L_i
    user_ptr,  # float token weights (HAS_USER)
    positions_ptr,  # int64 given positions (POSITIONS_GIVEN, or packed input's sequence starts)
    tokens_ptr,  # int64 (CHECK_TOKENS)
    teacher_logprobs_ptr,  # float (CHECK_TEACHER_LOGPROBS)
    rollout_ptr,  # float (CHECK_ROLLOUT)
    table_ptr,  # fp32 PositionTable values
    num_items_ptr,  # a 1-element tensor (NUM_ITEMS == 2)
    # outputs
    out_ptr,  # fp32: [1] the loss, or [N] for "none"
    weight_ptr,  # fp32 [N] final w_i (0 where invalid)
    position_ptr,  # fp32 [N] pos_i (0 where invalid)
    coef_ptr,  # fp32 [N] d loss / d L_i
    flags_ptr,  # int32 [NUM_CHECKS]
    # scratch
    segment_ptr,  # int32 [N] sequence id of each token
    count_ptr,  # fp32 [N] per sequence: valid tokens
    abs_total_ptr,  # fp32 [N] per sequence: sum |D|
    prefix_ptr,  # fp32 [N] per token: exclusive prefix of |D| in its sequence
    # sizes
    N,
    T,  # row length (SEGMENTS == 0)
    V,  # vocabulary (token checks)
    table_len,
    # scalars
    pos_a,  # half_life, alpha, window start, or sigmoid w_min
    pos_b,  # window end, or sigmoid center
    pos_c,  # sigmoid: log2(e) / scale
    confidence_exp,
    disagreement_exp,
    gamma,
    eps,
    num_items_value,  # NUM_ITEMS == 1
    logprob_tolerance,
    w_max,  # W_MAX
    # meta
    SEGMENTS: tl.constexpr,
    POSITION: tl.constexpr,
    POSITIONS_GIVEN: tl.constexpr,
    HAS_USER: tl.constexpr,
    CONFIDENCE: tl.constexpr,
    DISAGREEMENT: tl.constexpr,
    ACCUMULATED: tl.constexpr,
    W_MAX: tl.constexpr,
    NORMALIZE: tl.constexpr,
    REDUCTION: tl.constexpr,
    NUM_ITEMS: tl.constexpr,  # 0 none, 1 a number, 2 a tensor
    CHECK_TOKENS: tl.constexpr,
    CHECK_TEACHER_LOGPROBS: tl.constexpr,
    CHECK_ROLLOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    cols = tl.arange(0, BLOCK)
    # ---- pass 1: positions, prefixes, sequence ids and totals
    carry_count = 0.0
    carry_abs = 0.0
    carry_segment = -1
    for start in range(0, N, BLOCK):
        offs = start + cols
        inside = offs < N
        valid = tl.load(valid_ptr + offs, mask=inside, other=0) != 0
        abs_d = tl.where(valid, tl.abs(tl.load(divergence_ptr + offs, mask=inside, other=0.0)), 0.0)
        if SEGMENTS == 0:
            starts = (offs % T) == 0
        elif SEGMENTS == 1:
            starts = (tl.load(positions_ptr + offs, mask=inside, other=1) == 0) | (offs == 0)
        else:
            starts = offs == 0
        starts = starts & inside
        s32 = starts.to(tl.int32)
        ones = valid.to(tl.float32)
        _, count_incl = tl.associative_scan((s32, ones), 0, _segmented_sum)
        _, abs_incl = tl.associative_scan((s32, abs_d), 0, _segmented_sum)
        segment = carry_segment + tl.cumsum(s32, 0)
        continues = segment == carry_segment  # before this block's first sequence start
        count_incl = tl.where(continues, count_incl + carry_count, count_incl)
        abs_incl = tl.where(continues, abs_incl + carry_abs, abs_incl)
        position = count_incl - ones
        tl.store(prefix_ptr + offs, abs_incl - abs_d, mask=inside)
        if not POSITIONS_GIVEN:
            tl.store(position_ptr + offs, position, mask=inside)
        tl.store(segment_ptr + offs, segment, mask=inside)
        # The last token of each sequence writes its totals (one writer per sequence).
        if SEGMENTS == 0:
            ends = ((offs % T) == T - 1) | (offs == N - 1)
        elif SEGMENTS == 1:
            nxt = offs + 1
            ends = (tl.load(positions_ptr + nxt, mask=nxt < N, other=0) == 0) | (offs == N - 1)
        else:
            ends = offs == N - 1
        ends = ends & inside
        tl.store(count_ptr + segment, count_incl, mask=ends)
        tl.store(abs_total_ptr + segment, abs_incl, mask=ends)
        last = tl.minimum(start + BLOCK, N) - 1
        carry_count = tl.sum(tl.where(offs == last, count_incl, 0.0), 0)
        carry_abs = tl.sum(tl.where(offs == last, abs_incl, 0.0), 0)
        carry_segment = tl.max(tl.where(inside, segment, -1), 0)

    # ---- pass 2: unnormalized weights, sums, checks
    total_w = 0.0
    n_valid = 0.0
    n_sequences = 0.0  # sequences with a valid token: sum over valid tokens of 1 / n_b
    sum_wl = 0.0  # sum w L
    sum_wl_seq = 0.0  # sum w L / n_b
    bad_user = 0
    bad_positions = 0
    bad_tokens = 0
    bad_tlp_finite = 0
    bad_tlp_range = 0
    bad_rollout_finite = 0
    bad_rollout_range = 0
    for start in range(0, N, BLOCK):
        offs = start + cols
        inside = offs < N
        valid = tl.load(valid_ptr + offs, mask=inside, other=0) != 0
        segment = tl.load(segment_ptr + offs, mask=inside, other=0)
        length = tl.load(count_ptr + segment, mask=inside, other=1.0)
        w = valid.to(tl.float32)
        if HAS_USER:
            user = tl.load(user_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            bad_user |= tl.max((valid & ~((user >= 0) & (tl.abs(user) < float("inf")))).to(tl.int32), 0)
            w = w * tl.where(valid, user, 0.0)
        if POSITIONS_GIVEN:
            given = tl.load(positions_ptr + offs, mask=inside, other=0)
            bad_positions |= tl.max((valid & (given < 0)).to(tl.int32), 0)
            position = given.to(tl.float32)
            tl.store(position_ptr + offs, position, mask=inside)
        else:
            position = tl.load(position_ptr + offs, mask=inside, other=0.0)
        if POSITION == POS_EXP:
            w = w * tl.math.exp2(-position / pos_a)
        if POSITION == POS_POWER:
            w = w * _pow(1.0 + position, -pos_a)
        if POSITION == POS_TABLE:
            index = tl.minimum(tl.maximum(position, 0.0), table_len - 1).to(tl.int32)
            w = w * tl.load(table_ptr + index, mask=inside, other=0.0)
        if POSITION == POS_WINDOW:
            relative = position / tl.maximum(length, 1.0)
            w = w * ((relative >= pos_a) & (relative < pos_b)).to(tl.float32)
        if POSITION == POS_SIGMOID:  # pos_c = log2(e) / scale (the launch's): sigmoid(x) = 1 / (1 + 2^(-x log2 e))
            relative = (position + 0.5) / tl.maximum(length, 1.0)
            w = w * (pos_a + (1.0 - pos_a) / (1.0 + tl.math.exp2((pos_b - relative) * pos_c)))
        if CONFIDENCE:
            confidence = tl.load(confidence_ptr + offs, mask=inside, other=1.0)
            w = w * _pow(tl.where(valid, confidence, 1.0), confidence_exp)
        divergence = tl.load(divergence_ptr + offs, mask=inside, other=0.0)
        if DISAGREEMENT:
            w = w * _pow(tl.where(valid, tl.abs(divergence), 1.0), disagreement_exp)
        if ACCUMULATED:
            prefix = tl.load(prefix_ptr + offs, mask=inside, other=0.0)
            total = tl.load(abs_total_ptr + segment, mask=inside, other=1.0)
            w = w * (1.0 + gamma * (1.0 - prefix / tl.maximum(total, eps)))
        if W_MAX:
            w = tl.where(w > w_max, w_max, w)  # NaN stays NaN, as torch's clamp_max
        w = tl.where(valid, w, 0.0)
        tl.store(weight_ptr + offs, w, mask=inside)
        loss = tl.load(loss_ptr + offs, mask=inside, other=0.0)
        wl = tl.where(valid, w * loss, 0.0)
        total_w += tl.sum(w, 0)
        n_valid += tl.sum(valid.to(tl.float32), 0)
        n_sequences += tl.sum(tl.where(valid, 1.0 / tl.maximum(length, 1.0), 0.0), 0)
        sum_wl += tl.sum(wl, 0)
        sum_wl_seq += tl.sum(tl.where(valid, wl / tl.maximum(length, 1.0), 0.0), 0)
        if CHECK_TOKENS:
            token = tl.load(tokens_ptr + offs, mask=inside, other=0)
            bad_tokens |= tl.max((valid & ((token < 0) | (token >= V))).to(tl.int32), 0)
        if CHECK_TEACHER_LOGPROBS:
            x = tl.load(teacher_logprobs_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            bad_tlp_finite |= tl.max((valid & ~(tl.abs(x) < float("inf"))).to(tl.int32), 0)
            bad_tlp_range |= tl.max((valid & (x > logprob_tolerance)).to(tl.int32), 0)
        if CHECK_ROLLOUT:
            x = tl.load(rollout_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            bad_rollout_finite |= tl.max((valid & ~(tl.abs(x) < float("inf"))).to(tl.int32), 0)
            bad_rollout_range |= tl.max((valid & (x > logprob_tolerance)).to(tl.int32), 0)

    # ---- the scalars: normalization and the reduction's denominator
    scale = 1.0
    if NORMALIZE:
        # total 0 (an empty window) gives all-zero weights; NaN or inf totals propagate.
        scale = tl.where(total_w == 0.0, 0.0, n_valid / total_w)
    bad_count = 0
    if REDUCTION == RED_MEAN:
        if NUM_ITEMS == 0:
            denominator = tl.maximum(n_valid, 1.0)
        else:
            if NUM_ITEMS == 1:
                count = num_items_value
            else:
                count = tl.load(num_items_ptr).to(tl.float32)
            bad_count = ((n_valid > 0) & ~((count > 0) & (tl.abs(count) < float("inf")))).to(tl.int32)
            denominator = tl.where(n_valid > 0, count, 1.0)
        factor = scale / denominator
        tl.store(out_ptr, sum_wl * factor)
    if REDUCTION == RED_SUM:
        factor = scale
        tl.store(out_ptr, sum_wl * factor)
    if REDUCTION == RED_SEQ_MEAN:
        sequences = tl.maximum(n_sequences + 0.5, 1.0).to(tl.int32).to(tl.float32)  # a count: round it
        factor = scale / sequences
        tl.store(out_ptr, sum_wl_seq * factor)
    if REDUCTION == RED_NONE:
        factor = scale

    # ---- pass 3: final weights, coefficients, per-token losses
    for start in range(0, N, BLOCK):
        offs = start + cols
        inside = offs < N
        w = tl.load(weight_ptr + offs, mask=inside, other=0.0) * scale
        valid = tl.load(valid_ptr + offs, mask=inside, other=0) != 0
        w = tl.where(valid, w, 0.0)
        tl.store(weight_ptr + offs, w, mask=inside)
        if REDUCTION == RED_SEQ_MEAN:
            segment = tl.load(segment_ptr + offs, mask=inside, other=0)
            length = tl.load(count_ptr + segment, mask=inside, other=1.0)
            coef = w / tl.maximum(length, 1.0) / sequences
        elif REDUCTION == RED_NONE:
            coef = w
            loss = tl.load(loss_ptr + offs, mask=inside, other=0.0)
            tl.store(out_ptr + offs, tl.where(valid, w * loss, 0.0), mask=inside)
        elif REDUCTION == RED_MEAN:
            coef = w / denominator
        else:
            coef = w
        tl.store(coef_ptr + offs, tl.where(valid, coef, 0.0), mask=inside)
        position = tl.load(position_ptr + offs, mask=inside, other=0.0)
        tl.store(position_ptr + offs, tl.where(valid, position, 0.0), mask=inside)

    tl.store(flags_ptr + 0, bad_user)
    tl.store(flags_ptr + 1, bad_positions)
    tl.store(flags_ptr + 2, bad_tokens)
    tl.store(flags_ptr + 3, bad_tlp_finite)
    tl.store(flags_ptr + 4, bad_tlp_range)
    tl.store(flags_ptr + 5, bad_rollout_finite)
    tl.store(flags_ptr + 6, bad_rollout_range)
    tl.store(flags_ptr + 7, bad_count)
