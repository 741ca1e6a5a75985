"""Paired comparisons for the demo's report, without scipy: Student's t distribution, paired-difference
confidence intervals, sign counts and Holm's step-down correction.

``t_cdf`` uses the regularized incomplete beta function (a continued fraction, evaluated by the modified
Lentz method), ``t_quantile`` inverts it by bisection; both are accurate to ~1e-12 for the degrees of freedom
used here.
"""

from __future__ import annotations

import math


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def paired(differences: list[float], confidence: float = 0.95) -> dict:
    """Mean of paired differences with a t-based confidence interval, the two-sided t-test p-value against 0,
    and sign counts. With fewer than two pairs (or all equal) the interval and p-value are NaN (p is 1 when
    every difference is exactly 0)."""
    values = [float(v) for v in differences]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    out = dict(n=n, mean=mean, sd=math.nan, ci_low=math.nan, ci_high=math.nan, t=math.nan, p=math.nan,
               positive=sum(v > 0 for v in values), negative=sum(v < 0 for v in values))
    if n < 2:
        return out
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    out["sd"] = sd
    if sd == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
        out["ci_low"] = out["ci_high"] = mean
        return out
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * se
    out.update(ci_low=mean - half, ci_high=mean + half, t=mean / se,
               p=2.0 * (1.0 - t_cdf(abs(mean / se), n - 1)))
    return out


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted
