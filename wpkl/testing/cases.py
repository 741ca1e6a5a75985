"""The named cases of ``check_loss``: each builds float64 student and teacher logits and a mask, and documents
the class of bug it catches (docs/design.md lists them too). Inputs are random (never zeros), the vocabularies
odd (primes, not multiples of a block), and every case has a fully or partly masked sequence unless it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Batch:
    student: torch.Tensor  # [B, T, V] float64
    teacher: torch.Tensor  # [B, T, V_t >= V] float64
    mask: torch.Tensor  # [B, T] bool
    temperature: float | None = None  # the case's own temperature (None: the caller's)


@dataclass(frozen=True)
class Case:
    name: str
    guards: str  # the bug class it catches
    make: Callable[[torch.Generator, bool], Batch]  # (generator, quick) -> Batch
    cuda_only: bool = False  # too large for a CPU: selected by default on CUDA only
    dtypes: tuple[str, ...] | None = None  # None: every dtype asked for


def _randn(g, *shape, scale=3.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _mask(g, B, T):
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[0, 0] = True
    if B > 1:
        mask[-1] = False  # a fully masked sequence
    return mask


def _random(g, quick):
    return Batch(_randn(g, 3, 6, 97), _randn(g, 3, 6, 97), _mask(g, 3, 6))


def _near_identical(g, quick):
    s = _randn(g, 3, 6, 101)
    return Batch(s, s + _randn(g, 3, 6, 101, scale=1e-3), _mask(g, 3, 6))


def _extreme(g, quick):
    s, t = _randn(g, 2, 5, 89, scale=40.0), _randn(g, 2, 5, 89, scale=40.0)
    s[..., :3], t[..., 3:6] = 250.0, -180.0
    return Batch(s, t, _mask(g, 2, 5))


def _banned(g, quick):
    s, t = _randn(g, 2, 5, 83), _randn(g, 2, 5, 83)
    banned = torch.randperm(83, generator=g)[:7]
    s[..., banned] = float("-inf")
    t[..., banned] = float("-inf")
    return Batch(s, t, _mask(g, 2, 5))


def _padded_teacher(g, quick):
    s, t = _randn(g, 2, 5, 79), _randn(g, 2, 5, 79 + 9)
    t[..., 79:] += 8.0  # the padding columns carry most of the teacher's mass: they must not count
    return Batch(s, t, _mask(g, 2, 5))


def _masking(g, quick):
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, :5] = True  # right padding
    mask[2, 3] = True  # one valid token; row 1 fully masked
    return Batch(_randn(g, 3, 8, 61), _randn(g, 3, 8, 61), mask)


def _all_masked(g, quick):
    return Batch(_randn(g, 2, 4, 53), _randn(g, 2, 4, 53), torch.zeros(2, 4, dtype=torch.bool))


def _temperature(g, quick):
    return Batch(_randn(g, 2, 5, 97, scale=6.0), _randn(g, 2, 5, 97, scale=6.0), _mask(g, 2, 5), temperature=2.5)


def _long_rows(g, quick):
    V = 32771 if quick else 151936
    return Batch(_randn(g, 1, 3, V), _randn(g, 1, 3, V), torch.tensor([[True, True, False]]))


def _production(g, quick):
    """N = 4096 tokens of V = 151936 (Qwen's vocabulary), generated on the CPU in float64 (about 5 GB)."""
    return Batch(_randn(g, 2, 2048, 151936), _randn(g, 2, 2048, 151936), _mask(g, 2, 2048))


CASES = (
    Case("random", "plain wrong math: a wrong formula, sign or normalization", _random),
    Case("near_identical", "cancellation: KL from a difference of separately rounded log-normalizers", _near_identical),
    Case("extreme", "overflow and lost precision: exp of unshifted logits, |logit| in the tens to hundreds", _extreme),
    Case("banned_token", "NaN from -inf logits both sides share (0 * (-inf - -inf) must be 0; TRL #5594)", _banned),
    Case("padded_teacher_vocab", "a teacher vocabulary padded beyond the student's: only the first V count "
         "(TRL #6252)", _padded_teacher),
    Case("masking", "padding, a fully masked sequence and a single valid token: token-count normalization and "
         "gradients that must be exactly 0", _masking),
    Case("all_masked", "a batch with no valid token: loss 0 and gradient 0, not NaN (0 / 0)", _all_masked),
    Case("temperature", "temperature applied to one side only, or after rounding (needs a fn that takes "
         "temperature=)", _temperature),
    Case("long_rows", "long vocabulary rows (V >= 32768; 151936 outside quick mode): block loops, int32 offsets, "
         "accumulation over many blocks", _long_rows),
    Case("production", "what only a realistic shape shows: N = 4096 tokens of V = 151936 in bf16 (grid limits, "
         "offsets past 2^31 elements, occupancy-dependent paths); CUDA only, not in quick mode", _production,
         cuda_only=True, dtypes=("bfloat16",)),
)
CASE_NAMES = tuple(case.name for case in CASES)


def select(names, cuda: bool = False, quick: bool = False) -> tuple[Case, ...]:
    """The named cases (None: every case this device and mode run by default)."""
    if names is None:
        return tuple(case for case in CASES if not case.cuda_only or (cuda and not quick))
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in CASE_NAMES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(map(repr, unknown))}; choose from {', '.join(CASE_NAMES)}")
    return tuple(case for case in CASES if case.name in names)
