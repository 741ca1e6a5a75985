"""Helpers shared by the forward and backward kernels: divergence ids, row addressing, row statistics."""

import triton
import triton.language as tl

# Divergence ids, passed to the kernels as the DIVERGENCE constexpr (one specialization each).
REVERSE_KL: tl.constexpr = 0
FORWARD_KL: tl.constexpr = 1
JSD: tl.constexpr = 2
SAMPLED: tl.constexpr = 3
DIVERGENCE_IDS = {"reverse_kl": 0, "forward_kl": 1, "jsd": 2, "sampled": 3}

# Rows of the fp32 per-token statistics buffer [NUM_STATS, N] the forward kernel writes.
# The first four are public (TokenStats); the rest are what the backward kernel needs.
STAT_DIVERGENCE: tl.constexpr = 0
STAT_CONFIDENCE: tl.constexpr = 1
STAT_STUDENT_ENTROPY: tl.constexpr = 2
STAT_TEACHER_ENTROPY: tl.constexpr = 3
STAT_STUDENT_LSE: tl.constexpr = 4  # logsumexp(s), s = student / T
STAT_TEACHER_LSE: tl.constexpr = 5  # logsumexp(u), u = teacher / T
STAT_MIXTURE_KL: tl.constexpr = 6  # jsd only: KL(p || m)
NUM_STATS = 7
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
def log_mixture(log_p, log_q, p, q, beta, log_1m_beta, log_beta):
    """log m for m = (1 - beta) p + beta q, never below its exact lower bounds.

    The clamp keeps log m finite wherever p > 0 or q > 0 even if (1 - beta) * p underflows in fp32.
    """
    m = (1.0 - beta) * p + beta * q
    log_m = tl.log(tl.maximum(m, 1e-38))
    return tl.maximum(log_m, tl.maximum(log_p + log_1m_beta, log_q + log_beta))


@triton.jit
def xlogy_term(prob, value):
    """prob * value, or 0 where prob == 0 (0 * log 0 = 0, and no NaN from 0 * inf)."""
    return tl.where(prob > 0, prob * value, 0.0)
