"""Per-token weights: the one place that defines how wpkl weights tokens.

Every backend computes the per-token divergence over the vocabulary first; the weights then
come from [N]-sized per-token vectors only (never from [N, V] data), with this formula::

    w_i = mask_i * token_weight_i * f(pos_i) * c_i ** confidence * |D_i| ** disagreement
          * (1 + accumulated * (1 - A_i / max(S_b, accumulated_eps)))     (accumulated_eps = 1e-8)
          * max(floor, exp(-alpha * Q_i))                                 (prefix_confidence)
    w_i = min(w_i, w_max)                                                 (w_max; None = no cap)

    c_i  teacher confidence max_j q_ij            D_i  detached divergence (0 ** 0 = 1)
    A_i  sum of |D_k| over the valid tokens k before i in the same sequence b
    S_b  sum of |D_k| over all valid tokens of sequence b
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

import functools
import math
from dataclasses import dataclass
from typing import Union

import torch



def _check_real(owner: str, name: str, value, *, minimum=None, strict=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{owner}.{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ExpDecay:
    """f(pos) = 2 ** (-pos / half_life): a token ``half_life`` positions later counts half as much."""

    half_life: float

    def __post_init__(self):
        object.__setattr__(self, "half_life", _check_real("ExpDecay", "half_life", self.half_life, minimum=0, strict=True))

    def __call__(self, position: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return torch.exp2(-position / self.half_life)


@dataclass(frozen=True)
class PowerDecay:
    """f(pos) = (1 + pos) ** (-alpha)."""

    alpha: float

    def __post_init__(self):
        object.__setattr__(self, "alpha", _check_real("PowerDecay", "alpha", self.alpha, minimum=0))

    def __call__(self, position: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        return (1.0 + position) ** (-self.alpha)


@dataclass(frozen=True)
class PositionTable:
    """f(pos) = values[min(pos, len(values) - 1)]: a lookup table whose last entry holds beyond its end."""

    values: tuple[float, ...]

    def __post_init__(self):
        values = self.values
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().reshape(-1).tolist()
        try:
            values = tuple(values)
        except TypeError:
            raise TypeError(f"PositionTable.values must be a sequence of numbers, got {type(self.values).__name__}") from None
        if not values:
            raise ValueError("PositionTable.values must not be empty")
        checked = tuple(_check_real("PositionTable", f"values[{i}]", v, minimum=0) for i, v in enumerate(values))
        object.__setattr__(self, "values", checked)

    def __call__(self, position: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        index = position.clamp(max=len(self.values) - 1).long()
        return _device_table(self.values, position.device, position.dtype)[index]


@functools.lru_cache(maxsize=64)
def _device_table(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built once per device and dtype: a host-to-device copy every step would synchronize with the GPU.
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass(frozen=True)
class PositionWindow:
    """f(pos) = 1 where start <= pos / n_b < end, else 0 (n_b: valid tokens in the sequence), 0 <= start < end <= 1.

    ``PositionWindow(0.0, 0.3)`` trains on the first 30% of each response and ``PositionWindow(0.7, 1.0)``
    on the last 30%: the position diagnostic of arXiv 2606.22600.
    """

    start: float
    end: float

    def __post_init__(self):
        start = _check_real("PositionWindow", "start", self.start, minimum=0)
        end = _check_real("PositionWindow", "end", self.end, minimum=0)
        # Relative positions: PositionWindow(30, 70) (percent) would silently weight nothing, and
        # PositionWindow(0, 30) everything.
        if not start < end <= 1.0:
            raise ValueError(
                f"PositionWindow takes fractions of the response, 0 <= start < end <= 1 (e.g. 0.0, 0.3 for the first "
                f"30%); got start={start}, end={end}"
            )
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    def __call__(self, position: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        relative = position / length.clamp_min(1)
        return ((relative >= self.start) & (relative < self.end)).to(position.dtype)


@dataclass(frozen=True)
class PrefixConfidence:
    """The IW-OPD authors' teacher prefix confidence weight: ``max(floor, exp(-alpha * Q_i))``.

    Q_i is the mean of the worst ``worst`` share (at least one) of the teacher's NLLs ``-log q(y_j)`` of the
    sampled tokens among the ``window`` valid tokens before token i in its sequence: a token is trusted less
    once the teacher has found the rollout's recent tokens very unlikely. The defaults are the authors'
    (``window=64``, worst 10% i.e. ``quantile=0.9``, ``alpha=1``) with the floor their code falls back to (0.01).
    """

    alpha: float = 1.0
    window: int = 64
    worst: float = 0.1
    floor: float = 0.01

    def __post_init__(self):
        object.__setattr__(self, "alpha", _check_real("PrefixConfidence", "alpha", self.alpha, minimum=0))
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise TypeError(f"PrefixConfidence.window must be an int, got {type(self.window).__name__}")
        if self.window < 1:
            raise ValueError(f"PrefixConfidence.window must be >= 1, got {self.window}")
        worst = _check_real("PrefixConfidence", "worst", self.worst, minimum=0, strict=True)
        if worst > 1:
            raise ValueError(f"PrefixConfidence.worst must be in (0, 1] (a share of the window), got {worst}")
        floor = _check_real("PrefixConfidence", "floor", self.floor, minimum=0)
        if floor > 1:
            raise ValueError(f"PrefixConfidence.floor must be in [0, 1], got {floor}")
        object.__setattr__(self, "worst", worst)
        object.__setattr__(self, "floor", floor)


PositionSchedule = Union[ExpDecay, PowerDecay, PositionTable, PositionWindow]
POSITION_SCHEDULES = (ExpDecay, PowerDecay, PositionTable, PositionWindow)


@dataclass(frozen=True)
class Weighting:
    """How tokens are weighted; ``None`` in the API means uniform (standard OPD, no normalization).

    position:     a schedule f(pos) (ExpDecay, PowerDecay, PositionTable, PositionWindow) or None
    confidence:   exponent on the teacher confidence c_i = max_j q_ij (0 = off)
    disagreement: exponent on the detached per-token divergence |D_i| (0 = off)
    accumulated:  IW-OPD gamma: 1 + gamma * (1 - prefix share of the sequence's accumulated |D|) (0 = off)
    normalize:    rescale the weights to mean 1 over the valid tokens of the batch (of this call: one micro-batch
                  of one rank; ``wpkl.distributed.global_weight_sum`` gives the global version)
    accumulated_eps: floor on a sequence's total |D| before dividing by it (TRL's ``iw_opd_epsilon``)
    prefix_confidence: a ``PrefixConfidence`` (the IW-OPD authors' windowed teacher-confidence weight) or None;
                  it needs the teacher's log-probability of each sampled token (see ``weighted_kl_loss``)
    w_max:        a cap on each token's weight before normalization (None = no cap); the IW-OPD authors'
                  ``iw_opd_weight_max`` (1.5), see the module docstring
    """

    position: PositionSchedule | None = None
    confidence: float = 0.0
    disagreement: float = 0.0
    accumulated: float = 0.0
    normalize: bool = True
    accumulated_eps: float = 1e-8
    prefix_confidence: PrefixConfidence | None = None
    w_max: float | None = None

    def __post_init__(self):
        if self.position is not None and not isinstance(self.position, POSITION_SCHEDULES):
            names = ", ".join(cls.__name__ for cls in POSITION_SCHEDULES)
            raise TypeError(f"Weighting.position must be one of {names} or None, got {type(self.position).__name__}")
        for name in ("confidence", "disagreement", "accumulated"):
            object.__setattr__(self, name, _check_real("Weighting", name, getattr(self, name), minimum=0))
        eps = _check_real("Weighting", "accumulated_eps", self.accumulated_eps, minimum=0, strict=True)
        object.__setattr__(self, "accumulated_eps", eps)
        if not isinstance(self.normalize, bool):
            raise TypeError(f"Weighting.normalize must be a bool, got {type(self.normalize).__name__}")
        if self.prefix_confidence is not None and not isinstance(self.prefix_confidence, PrefixConfidence):
            raise TypeError(f"Weighting.prefix_confidence must be a PrefixConfidence or None, "
                            f"got {type(self.prefix_confidence).__name__}")
        if self.w_max is not None:
            object.__setattr__(self, "w_max", _check_real("Weighting", "w_max", self.w_max, minimum=0, strict=True))

    @property
    def needs_sequences(self) -> bool:
        """True when the weights need sequence structure ([B, T] input or packed positions)."""
        return self.position is not None or self.accumulated > 0 or self.prefix_confidence is not None

    @property
    def needs_teacher_token_logprobs(self) -> bool:
        """True when the weights need log q(y) of the sampled tokens (``prefix_confidence``)."""
        return self.prefix_confidence is not None


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


def prefix_confidence_factor(teacher_nll: torch.Tensor, valid: torch.Tensor, spec: PrefixConfidence) -> torch.Tensor:
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


def compute_weights(
    weighting: Weighting | None,
    *,
    valid: torch.Tensor,
    divergence: torch.Tensor,
    confidence: torch.Tensor,
    user_weights: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weights w of the module docstring, for [S, L] tensors laid out one sequence per row.

    ``divergence`` and ``confidence`` are the detached per-token D_i and c_i (any value where invalid).
    ``positions`` overrides the positions counted from ``valid``. ``teacher_token_logprobs`` holds log q(y_i)
    of the sampled tokens (needed by ``prefix_confidence``). Returns w with 0 on invalid tokens.
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
    if weighting.w_max is not None:
        w = w.clamp_max(weighting.w_max)
    if weighting.normalize:
        total = w.sum()
        n_valid = valid.sum().to(dtype)
        # total == 0 (e.g. an empty window) gives all-zero weights; NaN or inf totals propagate.
        w = torch.where(total == 0, torch.zeros_like(w), w * (n_valid / total))
    return torch.where(valid, w, 0.0)
