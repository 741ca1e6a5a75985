"""Per-token weights: the one place that defines how wpkl weights tokens (the types and their options are
wpkl/weighting.py).

Every backend computes the per-token divergence over the vocabulary first; the weights then
come from [N]-sized per-token vectors only (never from [N, V] data), with this formula::

    w_i = mask_i * token_weight_i * f(pos_i) * c_i ** confidence * |D_i| ** disagreement
          * (1 + accumulated * (1 - A_i / max(S_b, accumulated_eps)))     (accumulated_eps = 1e-8)
          * max(floor, exp(-alpha * Q_i))                                 (prefix_confidence)
          * 1[s_i >= s_(k)]                                               (token_importance)
    w_i = min(w_i, w_max)                                                 (w_max; None = no cap)

    c_i  teacher confidence max_j q_ij            D_i  detached divergence (0 ** 0 = 1)
    A_i  sum of |D_k| over the valid tokens k before i in the same sequence b
    S_b  sum of |D_k| over all valid tokens of sequence b
    s_i  TIP's importance h_i + d_i - h_i d_i (arXiv 2604.14084), h_i the student's entropy and d_i the |D_i|,
         each min-max normalized over the batch's valid tokens ((x - min) / (max - min), 0 when max == min);
         s_(k) the k-th largest s over the valid tokens, k = ceil(keep * n_valid) (ties at s_(k) all kept)
    Q_i  mean of the k_i largest teacher NLLs -log q(y_j) over the n_i = min(window, pos_i) valid tokens j
         just before i in its sequence (i itself excluded), k_i = max(1, floor(worst * n_i)); Q_i = 0 for the
         first token of a sequence

and, with ``normalize=True``, ``w_i *= n_valid / sum(w)`` (all weights 0 when ``sum(w) == 0``), after the cap.
Weights are constants for autograd: no gradient flows through them.

The IW-OPD authors' variants (arXiv 2606.22600; their verl code, YannX1e/Importance-Weighted-On-Policy-
Distillation, ``verl/workers/actor/dp_actor.py`` at commit a51b231, options ``iw_opd_weight_*`` and
``teacher_prefix_conf_*``):

- their IW-OPD weight is ``g_t = 1 + (w_max - 1) * clamp(1 - F_{t-1}, 0, 1)`` with ``F_{t-1}`` the prefix share
  of the sequence's summed ``|log q(y) - log p(y)|`` (divided by ``total + 1e-8``), ``w_max = 1.5`` by default,
  and no renormalization: ``Weighting(accumulated=w_max - 1, normalize=False)`` here (up to where the 1e-8
  enters), whose weights lie in [1, w_max] on their own. ``w_max`` here is that bound made explicit, as a cap
  on the raw weight before any normalization, so that it also binds for a larger gamma or combined factors.
- their teacher prefix confidence weight is ``max(weight_min, exp(-alpha * Q_t))``, Q_t the mean of the
  worst (1 - quantile) share of the teacher's NLLs in the window of ``window`` tokens before t (k =
  max(1, floor((1 - quantile) * count))), ``window=64``, ``quantile=0.9``, ``alpha=1``, no renormalization.
  Their code falls back to ``weight_min=0.01``; their config files set 0.0. ``PrefixConfidence`` defaults to
  0.01. Their window counts raw positions of the padded response; here it counts the valid tokens of the
  sequence, which is the same for a response without holes in its mask.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..weighting import Weighting


def sequence_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position of each token among the valid tokens of its sequence: the first valid token is 0."""
    counts = valid.to(torch.int64).cumsum(dim=-1)
    return counts - valid.to(torch.int64)


def accumulated_factor(abs_divergence: torch.Tensor, valid: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """IW-OPD: 1 + gamma * (1 - A_i / max(S_b, eps)) over [S, L] sequences, A_i the exclusive prefix sum."""
    abs_divergence = torch.where(valid, abs_divergence, 0.0)
    prefix = abs_divergence.cumsum(dim=-1) - abs_divergence
    total = abs_divergence.sum(dim=-1, keepdim=True).clamp_min(eps)
    return 1.0 + gamma * (1.0 - prefix / total)


def prefix_confidence_factor(teacher_nll: torch.Tensor, valid: torch.Tensor, spec) -> torch.Tensor:
    """max(floor, exp(-alpha * Q_i)) over [S, L] sequences (see the module docstring); 1 on invalid tokens.

    Valid tokens are first moved to the front of their row (in order), so that the window counts valid tokens.
    Memory: [S, L, window] values of the NLL's dtype.
    """
    S, L = valid.shape
    if L == 0:
        return torch.ones_like(teacher_nll)
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # valid tokens first, in order
    nll = torch.where(valid, teacher_nll, 0.0).gather(-1, order)
    window = spec.window
    padded = torch.nn.functional.pad(nll, (window, 0), value=float("-inf"))
    windows = padded.unfold(-1, window, 1)[:, :L]  # [S, L, window]: the `window` values before each position
    count = torch.arange(L, device=valid.device).clamp(max=window)  # n_i (correct for the valid tokens, in front)
    # k_i = max(1, floor(worst * n_i)); the 1e-6 makes e.g. 10% of 20 tokens 2 in every dtype.
    k = (spec.worst * count.double() + 1e-6).floor().long().clamp(min=1)
    k_max = int(min(window, max(1, math.floor(spec.worst * window + 1e-6))))
    worst_values = windows.topk(k_max, dim=-1).values  # sorted, largest first
    chosen = torch.arange(k_max, device=valid.device) < k.unsqueeze(-1)  # [L, k_max]
    q = torch.where(chosen, worst_values, 0.0).sum(-1) / k.to(nll.dtype)
    q = torch.where(count > 0, q, 0.0)
    factor = torch.exp(-spec.alpha * q).clamp_min(spec.floor)
    factor = torch.empty_like(factor).scatter(-1, order, factor)  # back to the original token order
    return torch.where(valid, factor, 1.0)


def token_importance_factor(student_entropy: torch.Tensor, divergence: torch.Tensor, valid: torch.Tensor,
                            keep: float) -> torch.Tensor:
    """TIP's selection 1[s_i >= s_(k)] (see the module docstring) over the valid tokens of the whole tensor; 0 on
    invalid tokens. No host sync: k and the threshold stay on the device."""
    def minmax(x: torch.Tensor) -> torch.Tensor:
        lo = torch.where(valid, x, float("inf")).amin() if x.numel() else x.new_zeros(())
        hi = torch.where(valid, x, float("-inf")).amax() if x.numel() else x.new_zeros(())
        span = hi - lo
        return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)

    h, d = minmax(student_entropy), minmax(divergence.abs())
    score = torch.where(valid, h + d - h * d, float("-inf"))
    n_valid = valid.sum()
    k = torch.ceil(keep * n_valid.double() - 1e-9).long().clamp(min=1)  # 1e-9: 0.5 * 10 is 5, in every dtype
    ordered = score.reshape(-1).sort(descending=True).values
    if ordered.numel() == 0:
        return torch.zeros_like(score)
    threshold = ordered.gather(0, (k - 1).clamp(max=ordered.numel() - 1).reshape(1))
    return (valid & (score >= threshold)).to(score.dtype)


def entropy_gate(teacher_entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """EOPD's gate 1[H_teacher >= threshold] (arXiv 2603.07079, Eq. 9; its code, WLS04/EOPD, uses >= with 0.8 nats):
    the tokens whose forward-KL term ``alpha * FKL_i`` is added to the on-policy term (wpkl.entropy_gated_loss).
    A NaN entropy (unknown teacher) gates nothing."""
    return (teacher_entropy >= threshold).to(teacher_entropy.dtype if teacher_entropy.is_floating_point()
                                             else torch.float32)


def mix_teachers(values, mixing) -> torch.Tensor:
    """MOPD's mixture of K teachers' per-token quantities, sum_k m_k * v_k (arXiv 2606.30406, Eq. 5: the
    weighted sum of the per-teacher divergences), with each m_k a number or a tensor broadcastable to v_k (a
    teacher per sequence or per token: one-hot routing). Used for the divergence, the teacher's confidence and
    entropy, and log q(y) (wpkl.multi_teacher_loss).

    A weight of 0 takes nothing of its teacher, not even a NaN or an infinity (0 * inf would be NaN): a token routed
    to one teacher never sees another's values."""
    total = None
    for value, weight in zip(values, mixing, strict=True):
        if isinstance(weight, torch.Tensor):
            weight = weight.to(value.device, value.dtype)
            term = torch.where(weight == 0, 0.0, value * weight)
        else:
            term = value * weight if weight != 0 else torch.zeros_like(value)
        total = term if total is None else total + term
    return total


def compute_weights(
    weighting: Weighting | None,
    *,
    valid: torch.Tensor,
    divergence: torch.Tensor,
    confidence: torch.Tensor,
    user_weights: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights w of the module docstring, for [S, L] tensors laid out one sequence per row.

    ``divergence`` and ``confidence`` are the detached per-token D_i and c_i (any value where invalid).
    ``positions`` overrides the positions counted from ``valid``. ``teacher_token_logprobs`` holds log q(y_i)
    of the sampled tokens (needed by ``prefix_confidence``), ``student_entropy`` the student's per-token entropy
    (needed by ``token_importance``). Returns w with 0 on invalid tokens.
    """
    dtype = divergence.dtype
    w = valid.to(dtype)
    if user_weights is not None:
        w = w * torch.where(valid, user_weights.to(dtype), 0.0)
    if weighting is None:
        return w
    if weighting.position is not None:
        pos = sequence_positions(valid) if positions is None else positions
        length = valid.sum(dim=-1, keepdim=True)
        w = w * weighting.position(pos.to(dtype), length.to(dtype))
    if weighting.confidence:
        w = w * torch.where(valid, confidence, 1.0) ** weighting.confidence
    if weighting.disagreement:
        w = w * torch.where(valid, divergence.abs(), 1.0) ** weighting.disagreement
    if weighting.accumulated:
        w = w * accumulated_factor(divergence.abs(), valid, weighting.accumulated, weighting.accumulated_eps)
    if weighting.prefix_confidence is not None:
        if teacher_token_logprobs is None:
            raise ValueError("Weighting(prefix_confidence=...) needs teacher_token_logprobs: log q(y) of the sampled tokens")
        nll = -teacher_token_logprobs.to(dtype)
        w = w * prefix_confidence_factor(nll, valid, weighting.prefix_confidence)
    if weighting.token_importance is not None:
        if student_entropy is None:
            raise ValueError("Weighting(token_importance=...) needs the student's per-token entropy")
        w = w * token_importance_factor(student_entropy.to(dtype), divergence, valid, weighting.token_importance.keep)
    if weighting.w_max is not None:
        w = w.clamp_max(weighting.w_max)
    if weighting.normalize:
        total = w.sum()
        n_valid = valid.sum().to(dtype)
        # total == 0 (e.g. an empty window) gives all-zero weights; NaN or inf totals propagate.
        w = torch.where(total == 0, torch.zeros_like(w), w * (n_valid / total))
    return torch.where(valid, w, 0.0)

