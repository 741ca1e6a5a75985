"""Helpers shared by the forward and backward kernels: divergence ids, row addressing, row statistics."""

import triton
import triton.language as tl

# Divergence ids, passed to the kernels as the DIVERGENCE constexpr (one specialization each).
REVERSE_KL = tl.constexpr(0)
FORWARD_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SAMPLED = tl.constexpr(3)
DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "sampled": 3}

# Rows of the fp32 per-token statistics buffer [NUM_STATS, N] the forward kernel writes.
# The first four are public (TokenStats); the rest are what the backward kernel needs.
STAT_DIVERGENCE = tl.constexpr(0)
STAT_CONFIDENCE = tl.constexpr(1)
STAT_STUDENT_ENTROPY = tl.constexpr(2)
STAT_TEACHER_ENTROPY = tl.constexpr(3)
STAT_STUDENT_LSE = tl.constexpr(4)  # logsumexp(s), s = student / T
STAT_TEACHER_LSE = tl.constexpr(5)  # logsumexp(u), u = teacher / T
STAT_MIXTURE_KL = tl.constexpr(6)  # jsd only: KL(p || m)
STAT_LSE_GAP = tl.constexpr(7)  # lse(s) - lse(u), summed from shifted pieces (more exact than the difference)
NUM_STATS = 8
NUM_PUBLIC_STATS = 4


@triton.jit
def row_offset(row, T, stride_b, stride_t):
    """Element offset of token ``row`` of a [B, T, V] tensor, in int64 so that N * V may pass 2**31.

    Two leading strides let a sliced view (logits[:, prompt_len - 1:-1]) be read without a copy.
    """
    row = row.to(tl.int64)
    b = row // T
    return b * stride_b + (row - b * T) * stride_t


@triton.jit
def online_softmax_step(x, running_max, running_sum, running_sum_x):
    """Fold one block of logits x into a running maximum and sums rescaled to it (online log-sum-exp).

    Returns the new maximum, the factor that rescaled the old sums, exp(x - max) of the block, and the new
    sum exp(x - max) and sum exp(x - max) * x. While every logit so far is -inf the shift is 0 instead,
    since exp(-inf - -inf) would be NaN.
    """
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    exp_x = tl.exp(x - shift)
    running_sum = running_sum * rescale + tl.sum(exp_x, axis=0)
    running_sum_x = running_sum_x * rescale + tl.sum(xlogy_term(exp_x, x), axis=0)
    return new_max, rescale, exp_x, running_sum, running_sum_x


@triton.jit
def logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def mixture_log_ratios(log_ratio, log_1m_beta, log_beta):
    """(log p - log m, log q - log m) for m = (1 - beta) p + beta q, from log_ratio = log q - log p.

    log m - log p = log((1 - beta) + beta q / p) depends on the ratio alone, so when p and q are close
    nothing large cancels. log_ratio = +inf (p = 0) and -inf (q = 0) give the exact limits.
    """
    log_p_m = -logaddexp(log_1m_beta, log_beta + log_ratio)
    log_q_m = -logaddexp(log_beta, log_1m_beta - log_ratio)
    return log_p_m, log_q_m


@triton.jit
def xlogy_term(prob, value):
    """prob * value, or 0 where prob == 0 (0 * log 0 = 0, and no NaN from 0 * inf); NaN prob propagates."""
    return tl.where(prob != 0, prob * value, 0.0)
