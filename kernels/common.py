"""Helpers shared by the kernels: divergence ids, row addressing, fast exp2/log2, and the per-token partials.

Partials. With c = log2(e) / T, a set of raw logits x (student s, teacher u) is summarized by

    m = max x,   z = sum 2^((x - m) c),   h = sum 2^((x - m) c) (x - m)

and, for the KL divergences, one cross sum with the weights of the distribution it averages over:

    reverse_kl   cross = sum 2^((s - m_s) c) (s - u)       forward_kl   cross = sum 2^((u - m_u) c) (u - s)

Units: exponentials and the logarithms of z in base 2 (exp2/log2 with 1/T and log2(e) folded into c); m, h,
cross and every log-ratio in raw logit units (the logits as stored, before the division by T), so that
logit differences are taken before any scaling (exact for close distributions) and a row whose mass sits
on one token cancels to exactly zero. z = h = 0 when every x is -inf (the shift is then 0, not -inf).

Partials of disjoint pieces of a vocabulary merge exactly (``rescale_partials``): the forward kernel keeps one
set per lane (a thread's VEC consecutive logits) and merges its lanes once per row (``merge_lanes``); a
vocabulary-parallel forward would merge the ranks' partials the same way after an all-reduce of the maxima.
``finalize_token`` turns a row's merged partials (and, for "sampled", the logits gathered at the sampled
token) into the per-token outputs; ``lane_jsd_step`` and ``finalize_jsd`` do the same for jsd's second pass.
"""

import os

import triton
import triton.language as tl

# Divergence ids, passed to the kernels as the DIVERGENCE constexpr (one specialization each).
REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SAMPLED = tl.constexpr(3)
DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "sampled": 3}

# Rows of the fp32 per-token statistics buffer [NUM_STATS, N] the forward kernel writes.
# The first four are public (TokenStats, nats); the rest are what the backward kernel needs, in raw logit units
# (T times the natural-log quantity) except STAT_AUX for jsd.
STAT_DIVERGENCE = tl.constexpr(0)
STAT_CONFIDENCE = tl.constexpr(1)
STAT_STUDENT_ENTROPY = tl.constexpr(2)
STAT_TEACHER_ENTROPY = tl.constexpr(3)
STAT_STUDENT_LSE = tl.constexpr(4)  # T logsumexp(s / T) = m_s + log2(z_s) / c
STAT_TEACHER_LSE = tl.constexpr(5)  # T logsumexp(u / T)
STAT_AUX = tl.constexpr(6)  # reverse_kl: E_p[s - u];  forward_kl: E_q[u - s];  jsd: KL(p || m) in bits
STAT_LSE_GAP = tl.constexpr(7)  # lse_s - lse_u, summed from shifted pieces (more exact than the difference)
NUM_STATS = 8
NUM_PUBLIC_STATS = 4

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NEG_INF: tl.constexpr = tl.constexpr(-float("inf"))
FLT_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


def _interpreting() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except ImportError:  # Triton < 3.4
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETING = _interpreting()


def device_function(fn):
    """``@triton.jit`` for the kernels' helpers; under the interpreter the plain function, which runs the same
    code (triton.language is patched while a kernel runs): the interpreter would patch it again on every call
    of a jit'd helper, about 2 ms each, which made up most of the CPU tests' time."""
    return fn if INTERPRETING else triton.jit(fn)


if INTERPRETING:
    # tl.sum and tl.max are jit'd functions (a re-patch per call); tl.reduce with their combine functions is
    # what they run, and the interpreter maps it straight to numpy (nanmax ignores NaN, as the GPU's max does).
    def reduce_sum(x, axis):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def reduce_max(x, axis):
        return tl.reduce(x, axis, tl.standard._elementwise_max)

else:

    @triton.jit
    def reduce_sum(x, axis: tl.constexpr):
        return tl.sum(x, axis=axis)

    @triton.jit
    def reduce_max(x, axis: tl.constexpr):
        return tl.max(x, axis=axis)


if INTERPRETING:

    def assume_multiple(offset, VEC):
        """tl.multiple_of, checked: the interpreter ignores the hint, and a wrong one would make the GPU's
        16-byte accesses misaligned, so here every offset given as a multiple of VEC must be one."""
        data = getattr(getattr(offset, "handle", None), "data", None)
        vec = int(getattr(VEC, "value", VEC))
        assert data is None or (data % vec == 0).all(), f"offset {data} hinted as a multiple of {vec}"
        return offset

else:
    # The builtin itself: a hint set inside a jit'd helper would land on the helper's argument and be lost.
    assume_multiple = tl.multiple_of


# The vocabulary loops use the GPU's approximate base-2 units: one MUFU instruction each, where tl.exp is five
# and tl.log a 25-instruction polynomial. ex2.approx.ftz.f32 has at most 2 ulp relative error and flushes
# results below 2^-126 to 0; lg2.approx.ftz.f32 at most 2^-22 absolute error; both are taken to be exact
# where the result is an integer (2^0 = 1, log2(2) = 1; not verifiable without a GPU). The interpreter cannot
# run PTX, so there they are emulated at their documented worst case (an error of that size elsewhere, its
# sign taken from the argument's lowest mantissa bit, and the flush), so that the CPU tests hold the kernels
# to their tolerances with the error the GPU makes.
APPROX_EXP2_REL_ERROR: tl.constexpr = tl.constexpr(2.0**-22)
APPROX_LOG2_ABS_ERROR: tl.constexpr = tl.constexpr(2.0**-22)
if INTERPRETING:

    @device_function
    def _error_sign(x):
        return tl.where((x.to(tl.float32).to(tl.int32, bitcast=True) & 1) == 0, 1.0, -1.0)

    @device_function
    def exp2_approx(x):
        exact = tl.math.exp2(x)
        y = tl.where(x == tl.floor(x), exact, exact * (1.0 + _error_sign(x) * APPROX_EXP2_REL_ERROR))
        return tl.where(x < -126.0, 0.0, y)

    @device_function
    def log2_approx(x):
        exact = tl.math.log2(x)
        return tl.where(exact == tl.floor(exact), exact, exact + _error_sign(x) * APPROX_LOG2_ABS_ERROR)

else:

    @device_function
    def exp2_approx(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @device_function
    def log2_approx(x):
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@device_function
def row_offset(row, T, stride_b, stride_t):
    """Element offset of token ``row`` of a [B, T, V] tensor, in int64 so that N * V may pass 2**31.

    Two leading strides let a sliced view (logits[:, prompt_len - 1:-1]) be read without a copy.
    """
    row = row.to(tl.int64)
    b = row // T
    return b * stride_b + (row - b * T) * stride_t


@device_function
def aligned_split(offset, V, VEC: tl.constexpr, BLOCK_V: tl.constexpr):
    """How a row of V elements at element ``offset`` (from a 16-byte aligned base) splits into pieces.

    Returns (peel, num_full, tail_start, tail_len): the first ``peel`` elements (< VEC) precede the row's
    first 16-byte boundary; ``num_full`` unmasked blocks of BLOCK_V aligned elements follow; then the tail
    block's ``tail_len`` (< BLOCK_V, a multiple of VEC) elements, whole 16-byte chunks from ``tail_start``
    on, masked per chunk so that its loads stay 16 bytes wide. What is left are the edges (< 2 VEC
    elements): the peel and the last partial chunk, see ``edge_columns``.
    """
    peel = tl.minimum(((VEC - offset % VEC) % VEC).to(tl.int32), V)
    num_full = (V - peel) // BLOCK_V
    tail_start = peel + num_full * BLOCK_V
    tail_len = assume_multiple(((V - tail_start) // VEC) * VEC, VEC)
    return peel, num_full, tail_start, tail_len


@device_function
def edge_columns(peel, end_start, V, VEC: tl.constexpr):
    """([2 VEC, 1] columns, mask) of a row's edges: the peel [0, peel) and the partial chunk [end_start, V)."""
    index = tl.arange(0, 2 * VEC)[:, None]
    col = tl.where(index < VEC, index, end_start + (index - VEC))
    return col, tl.where(index < VEC, index < peel, col < V)


@device_function
def into_lane0(x, LANES: tl.constexpr, init):
    """A [LANES] vector holding the scalar x in lane 0 and ``init`` elsewhere: the edges' partials start the
    lanes' running partials, so that the row merge (merge_lanes) takes them in with the rest."""
    return tl.where(tl.arange(0, LANES) == 0, x, init)


@device_function
def to_float(x):
    """Logits to fp32. bf16 is the top half of an fp32, so it is widened with integer moves: a shift, or a mask
    for the upper element of a packed pair (LLVM's own conversion extracts that one first, 2 instructions)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@device_function
def load_logits(student_ptr, teacher_ptr, student_row, teacher_row, start, cols, in_block, VEC: tl.constexpr,
                TEACHER_LOGITS: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The block of student and teacher logits at columns ``start + cols`` (16-byte aligned for the
    student, and for the teacher when ALIGNED), as fp32; masked per 16-byte chunk by ``in_block`` if MASKED.
    Without TEACHER_LOGITS the teacher is not read and the student block is returned in its place."""
    student_start = assume_multiple(student_row + start, VEC)
    teacher_start = teacher_row + start
    if ALIGNED:
        teacher_start = assume_multiple(teacher_start, VEC)
    if MASKED:
        s = to_float(tl.load(student_ptr + student_start + cols, mask=in_block, other=NEG_INF))
    else:
        s = to_float(tl.load(student_ptr + student_start + cols))
    u = s
    if TEACHER_LOGITS:
        if MASKED:
            u = to_float(tl.load(teacher_ptr + teacher_start + cols, mask=in_block, other=NEG_INF))
        else:
            u = to_float(tl.load(teacher_ptr + teacher_start + cols))
    return s, u


@device_function
def xlogy_term(prob, value):
    """prob * value, or 0 where prob == 0 (0 * log 0 = 0, and no NaN from 0 * inf); NaN prob propagates."""
    return tl.where(prob != 0, prob * value, 0.0)


@device_function
def lane_softmax_step(x, scale, m, z, h, AXIS: tl.constexpr = 0):
    """Fold a [VEC, LANES] block of raw logits into per-lane partials (m, z, h), each [LANES] (AXIS = 1: a
    [K, VEC, LANES] block of K teachers into [K, LANES] partials).

    Returns the new (m, z, h), the factor that rescaled the old sums, and 2^((x - m) c) of the block (for the
    cross sums). The block maximum is an in-thread reduction (a lane's VEC logits live in one thread), so
    the loop needs no barrier and no shuffle. While a lane has seen only -inf its shift is 0, since
    2^(-inf - -inf) would be NaN; a NaN logit makes z NaN (maxima ignore NaN, sums do not).
    """
    new_m = tl.maximum(m, reduce_max(x, AXIS))
    shift = tl.where(new_m == NEG_INF, 0.0, new_m)
    delta = m - shift  # <= 0; -inf while the lane had seen only -inf (then z = h = 0)
    alpha = exp2_approx(delta * scale)
    d = x - tl.expand_dims(shift, AXIS)
    e = exp2_approx(d * scale)
    # h rescales as sum e' (x - m') = alpha (h + (m - m') z); the clamps keep 0 * -inf out of both products.
    h = alpha * (h + tl.maximum(delta, FLT_LOWEST) * z) + reduce_sum(e * tl.maximum(d, FLT_LOWEST), AXIS)
    z = alpha * z + reduce_sum(e, AXIS)
    return new_m, z, h, alpha, e


@device_function
def rescale_partials(m, z, h, new_max, scale):
    """Partials (m, z, h) rescaled to a common maximum ``new_max`` >= m: returns (z', h', factor).

    z' = 2^((m - M) c) z and h' = 2^((m - M) c) (h + (m - M) z), so that partials of disjoint pieces add
    up. ``factor`` rescales any other sum with the same weights (the cross sums). Pieces that saw only -inf
    get factor 0 (their sums are 0, or NaN, which still propagates).
    """
    shift = tl.where(new_max == NEG_INF, 0.0, new_max)
    delta = tl.where(m == NEG_INF, 0.0, m - shift)
    factor = tl.where(m == NEG_INF, 0.0, exp2_approx(delta * scale))
    return factor * z, factor * (h + delta * z), factor


@device_function
def merge_lanes(m, z, h, scale, AXIS: tl.constexpr = 0):
    """Merge per-lane partials ([LANES] each; AXIS = 1: [K, LANES]) into the row's (scalars; [K]), and the factors."""
    row_max = reduce_max(m, AXIS)
    z, h, factor = rescale_partials(m, z, h, tl.expand_dims(row_max, AXIS), scale)
    return row_max, reduce_sum(z, AXIS), reduce_sum(h, AXIS), factor


@device_function
def finalize_token(scale, inv_temperature, m_s, z_s, h_s, m_u, z_u, h_u, cross, s_y, u_y, log_q_y,
                   log_p_behaviour, power, DIVERGENCE: tl.constexpr, TEACHER_LOGITS: tl.constexpr,
                   HAS_ROLLOUT: tl.constexpr, POWER: tl.constexpr):
    """Per-token outputs from a row's merged partials (see the module docstring).

    ``s_y``, ``u_y`` are the raw logits at the sampled token ("sampled" with teacher logits), ``log_q_y``
    the given teacher log-prob (without them) and ``log_p_behaviour`` the sampling policy's (HAS_ROLLOUT).
    Returns (loss, divergence, confidence, student entropy, teacher entropy) in nats, and, in raw logit units
    for the backward pass, (lse_s, lse_u, lse_gap, aux) with lse = T logsumexp(x / T) and aux the cross mean
    (E_p[s - u] or E_q[u - s]; for "sampled" the multiplier -a of log p(y), which the backward reads: D, or with
    POWER PowerOPD's exp(power log p(y)) - exp(power log q(y)), log p(y) the behaviour's). Combining shifted pieces before large magnitudes, lse_gap = (m_s - m_u) +
    (log2 z_s - log2 z_u) / c and D = (E_p[s - u] - lse_gap) / T are exact when p == q, where lse_s - lse_u
    is not. The divisions that feed the divergence are exact (div_rn).
    """
    log2_z_s = tl.math.log2(z_s)
    lse_s = m_s + tl.math.div_rn(log2_z_s, scale)
    student_entropy = log2_z_s * LN2 - tl.math.div_rn(h_s, z_s) * inv_temperature
    if TEACHER_LOGITS:
        log2_z_u = tl.math.log2(z_u)
        lse_u = m_u + tl.math.div_rn(log2_z_u, scale)
        lse_gap = (m_s - m_u) + tl.math.div_rn(log2_z_s - log2_z_u, scale)
        teacher_entropy = log2_z_u * LN2 - tl.math.div_rn(h_u, z_u) * inv_temperature
        confidence = tl.math.div_rn(1.0, z_u)  # max q = 2^((m_u - lse_u) c)
    else:
        lse_u = 0.0
        lse_gap = 0.0
        teacher_entropy = float("nan")  # unknown without the teacher's logits
        confidence = float("nan")
    aux = 0.0
    divergence = 0.0  # jsd: from the second pass (finalize_jsd)
    if DIVERGENCE == REVERSE_KL:
        aux = tl.math.div_rn(cross, z_s)
        divergence = (aux - lse_gap) * inv_temperature
    if DIVERGENCE == FORWARD_KL:
        aux = tl.math.div_rn(cross, z_u)
        divergence = (aux + lse_gap) * inv_temperature
    loss = divergence
    if DIVERGENCE == SAMPLED:
        log_p_y = (s_y - lse_s) * inv_temperature
        if TEACHER_LOGITS:
            log_q_y = (u_y - lse_u) * inv_temperature
        if HAS_ROLLOUT:
            divergence = log_p_behaviour - log_q_y
        elif TEACHER_LOGITS:
            divergence = ((s_y - u_y) - lse_gap) * inv_temperature  # log p(y) - log q(y), logits subtracted first
        else:
            divergence = log_p_y - log_q_y
        aux = divergence  # -a, held constant
        if POWER:  # PowerOPD: -a = p(y)^power - q(y)^power
            behaviour = log_p_behaviour if HAS_ROLLOUT else log_p_y
            aux = tl.exp(power * behaviour) - tl.exp(power * log_q_y)
        loss = aux * log_p_y  # -a log p(y)
    return loss, divergence, confidence, student_entropy, teacher_entropy, lse_s, lse_u, lse_gap, aux


@device_function
def mixture_log2_ratios(r, log2_1m_beta, log2_beta, PRECISE_LOG2: tl.constexpr):
    """(log2(m / p), log2(m / q)) for m = (1 - beta) p + beta q, from r = log2(q / p).

    With a = log2(1 - beta) and b = log2(beta) + r, log2(m / p) = logaddexp2(a, b) and log2(m / q) =
    logaddexp2(log2(beta), a - r): both share |a - b|, so one exp2 and one log2 serve them. They depend on
    the ratio alone, so close distributions cancel nothing large; p = 0 (r = +inf), q = 0 (r = -inf) and
    beta rounding to 0 or 1 give the exact limits. For close distributions log2(m / p) is small and sums
    max(a, b) with a tail of the opposite sign, so its absolute error is the tail's: lg2.approx's 2^-22 is
    far below what bf16/fp16 gradients resolve but not below fp32's, so fp32 logits (PRECISE_LOG2) take
    the precise log2 (tl.math.log2).
    """
    a = log2_1m_beta
    b = log2_beta + r
    e = 1.0 + exp2_approx(-tl.abs(a - b))
    tail = tl.math.log2(e) if PRECISE_LOG2 else log2_approx(e)
    return tl.maximum(a, b) + tail, tl.maximum(log2_beta, a - r) + tail


@device_function
def mixture_r(s, u, scale, lse_gap):
    """r = log2(q / p) from raw logits: ((u - s) + lse_gap) c, the logits subtracted first."""
    return ((u - s) + lse_gap) * scale


@device_function
def lane_jsd_step(s, u, scale, lse_s, lse_u, lse_gap, log2_1m_beta, log2_beta, PRECISE_LOG2: tl.constexpr):
    """jsd's second pass over a [VEC, LANES] block: per-lane sums of p log2(m/p), q log2(m/q), p and q."""
    log2_m_p, log2_m_q = mixture_log2_ratios(mixture_r(s, u, scale, lse_gap), log2_1m_beta, log2_beta, PRECISE_LOG2)
    p = exp2_approx((s - lse_s) * scale)
    q = exp2_approx((u - lse_u) * scale)
    return (reduce_sum(xlogy_term(p, log2_m_p), 0), reduce_sum(xlogy_term(q, log2_m_q), 0),
            reduce_sum(p, 0), reduce_sum(q, 0))


@device_function
def finalize_jsd(beta, m_p_sum, m_q_sum, mass_p, mass_q):
    """jsd from its second pass's merged partials (sum p log2(m/p), sum q log2(m/q), sum p, sum q).

    Normalizing by the mass sums of the same p and q cancels the rounding of lse_s and lse_u that all
    terms share: with a saturated jsd the backward's log p/m - KL(p || m) cancels down to that size.
    Returns (divergence in nats, KL(p || m) in bits).
    """
    kl2_pm = -tl.math.div_rn(m_p_sum, mass_p)
    kl2_qm = -tl.math.div_rn(m_q_sum, mass_q)
    return (beta * kl2_qm + (1.0 - beta) * kl2_pm) * LN2, kl2_pm
