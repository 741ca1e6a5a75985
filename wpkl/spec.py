"""The loss specification: one frozen, validated object holding every option of a wpkl loss.

``weighted_kl_loss`` and ``fused_linear_kl_loss`` (and their modules) build one ``LossSpec`` from their options
and hand it down; nothing below them re-lists options. Its fields are the options' names as the public API spells
them (the fused-linear form's projection options grouped in ``LinearOptions``), so that

    LossSpec.from_options(**options)      routes each public option to its field (a ``TypeError`` for an unknown one)
    spec.options()                        gives them back, flat
    spec.agreement_key()                  is what every rank of a process group must share (all fields but the
                                          groups themselves: derived, never a hand-kept list)

Validation happens once, in ``__post_init__``: a bad option raises a ``ValueError`` or ``TypeError`` naming it,
at construction (a module's constructor fails, not its first training step). What needs the inputs too (a top-k
option without a top-k teacher, say) is checked with them (wpkl/inputs/build.py).
"""

from __future__ import annotations

import math
import numbers
import zlib
from dataclasses import dataclass, field, fields

from .reference import DIVERGENCES, TOPK_MODES, TopKOptions, exact_divergence
from .weighting import Weighting

REDUCTIONS = ("mean", "sum", "seq_mean", "none")
BACKENDS = ("auto", "triton", "torch", "reference")


def choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_group(name: str, group) -> None:
    if group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


class _Frozen:
    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class LinearOptions(_Frozen):
    """The fused-linear form's projection: logits = softcap(scale * (hidden @ weight.T + bias)), chunked."""

    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    chunk_size: int | None = None  # tokens per chunk; None: from the memory budget (wpkl/engine/linear.py)

    def __post_init__(self):
        for name in ("student_logit_scale", "teacher_logit_scale"):
            self._set(name, real(name, getattr(self, name)))
        for name in ("student_softcap", "teacher_softcap"):
            cap = getattr(self, name)
            if cap is not None:
                cap = real(name, cap)
                if cap <= 0:
                    raise ValueError(f"{name} must be > 0 (or None), got {cap}")
                self._set(name, cap)
        size = self.chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {size!r}")


@dataclass(frozen=True)
class LossSpec(_Frozen):
    """Every option of a loss call. The public functions document each (wpkl/api/functional.py)."""

    divergence: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    weighting: Weighting | None = None
    reduction: str = "mean"
    backend: str = "auto"
    return_stats: bool = False
    inplace_backward: bool = field(default=False, metadata={"materialized only": True})
    topk_mode: str = "tail"
    topk_logprob_floor: float | None = None
    topk_loss_max: float | None = None
    linear: LinearOptions | None = None  # the fused-linear form's options (None: materialized logits)
    process_group: object = field(default=None, metadata={"group": True})  # vocabulary shards
    sequence_group: object = field(default=None, metadata={"group": True})  # sequence shards (wpkl/parallel/sequence.py)
    sampled_power: float | None = None  # "sampled": PowerOPD's exponent (wpkl/reference/core.py: sampled_multiplier)

    def __post_init__(self):
        choice("divergence", self.divergence, DIVERGENCES)
        choice("backend", self.backend, BACKENDS)
        choice("reduction", self.reduction, REDUCTIONS)
        beta = real("beta", self.beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        temperature = real("temperature", self.temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self._set("beta", beta)
        self._set("temperature", temperature)
        if self.weighting is not None and not isinstance(self.weighting, Weighting):
            raise TypeError(f"weighting must be a wpkl.Weighting or None, got {type(self.weighting).__name__}")
        _flag("return_stats", self.return_stats)
        _flag("inplace_backward", self.inplace_backward)
        if self.inplace_backward and self.backend in ("torch", "reference"):
            raise ValueError(f'inplace_backward=True needs the Triton backend; backend={self.backend!r} always '
                             'allocates the gradient (with backend="auto" it is ignored off the Triton path)')
        choice("topk_mode", self.topk_mode, TOPK_MODES)
        for name in ("topk_logprob_floor", "topk_loss_max"):
            value = getattr(self, name)
            if value is not None:
                if self.topk_mode != "raw":
                    raise ValueError(f'{name} applies to topk_mode="raw" (verl\'s clamps), not {self.topk_mode!r}')
                self._set(name, real(name, value))
        if self.sampled_power is not None:
            if self.divergence != "sampled":
                raise ValueError(f'sampled_power (PowerOPD) applies to divergence="sampled", not {self.divergence!r}')
            power = real("sampled_power", self.sampled_power)
            if power <= 0:
                raise ValueError(f"sampled_power must be > 0 (PowerOPD's alpha; None for the log-ratio), got {power}")
            self._set("sampled_power", power)
        if self.linear is not None and not isinstance(self.linear, LinearOptions):
            raise TypeError(f"linear must be a wpkl.spec.LinearOptions or None, got {type(self.linear).__name__}")
        for name in GROUP_FIELDS:
            _check_group(name, getattr(self, name))

    # ------------------------------------------------------------------ the public options, flat

    @classmethod
    def option_names(cls, linear: bool) -> tuple[str, ...]:
        """The public option names of the materialized (or, ``linear=True``, the fused-linear) form."""
        return OPTION_NAMES[bool(linear)]

    @classmethod
    def group_names(cls) -> tuple[str, ...]:
        """The options that are process groups (``process_group``, ``sequence_group``)."""
        return GROUP_FIELDS

    @classmethod
    def from_options(cls, *, linear: bool = False, **options) -> LossSpec:
        """A spec from the public options (``linear``: the fused-linear form, whose projection options it takes)."""
        inner = LINEAR_NAMES
        unknown = set(options) - set(cls.option_names(linear))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(sorted(unknown))}")
        top = {k: v for k, v in options.items() if k not in inner}
        group = LinearOptions(**{k: v for k, v in options.items() if k in inner}) if linear else None
        return cls(**top, linear=group)

    def options(self) -> dict:
        """The public options, flat (the inverse of ``from_options``)."""
        names = self.option_names(self.linear is not None)
        linear = self.linear
        return {name: getattr(linear, name) if name in LINEAR_NAMES else getattr(self, name) for name in names}

    def replace(self, **options) -> LossSpec:
        """A copy with some public options changed, validated again."""
        return type(self).from_options(linear=self.linear is not None, **{**self.options(), **options})

    # ------------------------------------------------------------------ derived

    @property
    def exact_divergence(self) -> str:
        """The divergence that computes this one (jsd at beta 0 or 1 is a KL: wpkl/reference/core.py)."""
        return exact_divergence(self.divergence, self.beta)

    @property
    def topk(self) -> TopKOptions:
        return TopKOptions(self.topk_mode, self.topk_logprob_floor, self.topk_loss_max)

    @property
    def needs_stats(self) -> bool:
        """Whether the teacher confidence and the entropies are needed (the torch pass skips them otherwise)."""
        weighting = self.weighting
        return self.return_stats or (weighting is not None and (weighting.confidence > 0
                                                                 or weighting.needs_student_entropy))

    @property
    def groups(self) -> dict:
        """The process groups the call spans (field name -> group; those that are set)."""
        return {name: getattr(self, name) for name in GROUP_FIELDS if getattr(self, name) is not None}

    def agreement_key(self) -> int:
        """A digest of every option but the groups: equal on every rank of a group, or the ranks disagree."""
        values = {name: value for name, value in self.options().items()
                  if name not in GROUP_FIELDS}
        return zlib.crc32(repr(sorted(values.items())).encode())


# The field lists, derived once from the classes (not at call time: torch.compile traces the calls, and Dynamo
# does not trace ``dataclasses.fields``).
LINEAR_NAMES = tuple(f.name for f in fields(LinearOptions))
GROUP_FIELDS = tuple(f.name for f in fields(LossSpec) if f.metadata.get("group"))
OPTION_NAMES = {
    linear: tuple(f.name for f in fields(LossSpec) if f.name != "linear"
                  and not (linear and f.metadata.get("materialized only"))) + (LINEAR_NAMES if linear else ())
    for linear in (False, True)
}
