"""The weighting options: ``Weighting`` and its position schedules, validated at construction. The formula
they parameterize is wpkl/reference/weights.py (each schedule's f(pos) is its ``__call__``)."""

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
class PositionSigmoid:
    """f(pos) = w_min + (1 - w_min) * sigmoid((u - center) / scale), u = (pos + 0.5) / n_b (n_b: valid tokens in the
    sequence): weights that rise with the position, from w_min at the start towards 1 at the end.

    PW-OPSD (arXiv 2605.21606; its code, SaFo-Lab/PW-OPSD): u = (i - 0.5) / L_b with i the 1-based index among
    the response's tokens, and the defaults are its "moderate" schedule (w_min 0.25, center 0.3, scale 0.1). The
    paper trains with ``reduction="seq_mean"`` and no renormalization: ``Weighting(position=PositionSigmoid(),
    normalize=False)``.
    """

    w_min: float = 0.25
    center: float = 0.3
    scale: float = 0.1

    def __post_init__(self):
        w_min = _check_real("PositionSigmoid", "w_min", self.w_min, minimum=0)
        if w_min > 1:
            raise ValueError(f"PositionSigmoid.w_min must be in [0, 1] (the weight at the start), got {w_min}")
        center = _check_real("PositionSigmoid", "center", self.center)
        scale = _check_real("PositionSigmoid", "scale", self.scale, minimum=0, strict=True)
        object.__setattr__(self, "w_min", w_min)
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "scale", scale)

    def __call__(self, position: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        relative = (position + 0.5) / length.clamp_min(1)
        return self.w_min + (1.0 - self.w_min) * torch.sigmoid((relative - self.center) / self.scale)


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


@dataclass(frozen=True)
class TokenImportance:
    """TIP's token selection (arXiv 2604.14084): train on the ``keep`` share of the batch's valid tokens with the
    highest importance ``s_i = h_i + d_i - h_i d_i``, with h_i the student's entropy and d_i the detached |D_i|,
    each min-max normalized over the batch's valid tokens (0 when all are equal). Selected tokens get weight 1,
    the rest 0; ties at the threshold are all kept (the selection is a function of the scores alone, the same
    for any split of the batch). With ``normalize=True`` (the default) and ``reduction="mean"`` the loss is the
    mean over the selected tokens, the paper's objective. ``keep=0.5`` is the paper's rho.
    """

    keep: float = 0.5

    def __post_init__(self):
        keep = _check_real("TokenImportance", "keep", self.keep, minimum=0, strict=True)
        if keep > 1:
            raise ValueError(f"TokenImportance.keep must be in (0, 1] (a share of the batch's tokens), got {keep}")
        object.__setattr__(self, "keep", keep)


PositionSchedule = Union[ExpDecay, PowerDecay, PositionTable, PositionWindow, PositionSigmoid]
POSITION_SCHEDULES = (ExpDecay, PowerDecay, PositionTable, PositionWindow, PositionSigmoid)


@dataclass(frozen=True)
class Weighting:
    """How tokens are weighted; ``None`` in the API means uniform (standard OPD, no normalization).

    position:     a schedule f(pos) (ExpDecay, PowerDecay, PositionTable, PositionWindow, PositionSigmoid) or None
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
    token_importance: a ``TokenImportance`` (TIP's selection of the batch's most important tokens by the
                  student's entropy and the divergence) or None
    """

    position: PositionSchedule | None = None
    confidence: float = 0.0
    disagreement: float = 0.0
    accumulated: float = 0.0
    normalize: bool = True
    accumulated_eps: float = 1e-8
    prefix_confidence: PrefixConfidence | None = None
    w_max: float | None = None
    token_importance: TokenImportance | None = None

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
        if self.token_importance is not None and not isinstance(self.token_importance, TokenImportance):
            raise TypeError(f"Weighting.token_importance must be a TokenImportance or None, "
                            f"got {type(self.token_importance).__name__}")

    @property
    def needs_sequences(self) -> bool:
        """True when the weights need sequence structure ([B, T] input or packed positions)."""
        return self.position is not None or self.accumulated > 0 or self.prefix_confidence is not None

    @property
    def needs_student_entropy(self) -> bool:
        """True when the weights need the student's per-token entropy (``token_importance``)."""
        return self.token_importance is not None

    @property
    def needs_batch(self) -> bool:
        """True when a token's weight, before normalization, depends on the whole batch (``token_importance``'s
        min-max scaling and threshold): the fused-linear form cannot weigh a chunk as soon as it is done."""
        return self.token_importance is not None

    @property
    def needs_teacher_token_logprobs(self) -> bool:
        """True when the weights need log q(y) of the sampled tokens (``prefix_confidence``)."""
        return self.prefix_confidence is not None
