"""The inputs of a loss call as data: the student, the teacher source and the token batch, gathered in a
``Problem`` with the call's ``LossSpec``.

Every tensor is laid out [B, T, ...]: packed [N, ...] input is viewed as [1, N, ...] (never copied), and
``TokenBatch.leading_shape`` keeps the caller's shape for the outputs. A new input form adds a student or teacher
class here and its adapter in the engine; a new per-token input adds a field to ``TokenBatch``: the layers
between pass the objects, not their fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..reference import TopK
from ..spec import LossSpec


@dataclass(frozen=True)
class StudentLogits:
    logits: torch.Tensor  # [B, T, V]

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (self.logits.dtype,)


@dataclass(frozen=True)
class StudentLinear:
    """logits = softcap(scale * (hidden @ weight.T + bias)) (options: ``LossSpec.linear``), never materialized."""

    hidden: torch.Tensor  # [B, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]

    @property
    def trainable(self) -> bool:
        return any(x is not None and x.requires_grad for x in (self.hidden, self.weight, self.bias))


@dataclass(frozen=True)
class TeacherLogits:
    logits: torch.Tensor  # [B, T, V_t >= V]; the first V columns are used


@dataclass(frozen=True)
class TeacherLinear:
    hidden: torch.Tensor  # [B, T, H_t]
    weight: torch.Tensor  # [V_t >= V, H_t]; the first V rows are used
    bias: torch.Tensor | None  # [V_t]


@dataclass(frozen=True)
class TeacherLogprobs:
    """The sampled-token form: log q(y) of each sampled token (a teacher server's answer), no distribution."""

    logprobs: torch.Tensor  # [B, T]


# A top-k teacher: ids [B, T, K] int64 (-1 pads) and their log q [B, T, K]; the specification's own type.
TeacherTopK = TopK
TEACHERS = (TeacherLogits, TeacherLinear, TeacherLogprobs, TopK)


@dataclass(frozen=True)
class TokenBatch:
    """The per-token inputs, [B, T] each (None when not given)."""

    valid: torch.Tensor  # bool: the tokens that count (the mask; all True when none was given)
    leading_shape: torch.Size  # the caller's leading shape: (B, T) or (N,)
    packed: bool  # the caller passed [N, ...] input
    positions: torch.Tensor | None = None  # int64
    token_weights: torch.Tensor | None = None  # float
    tokens: torch.Tensor | None = None  # int64: the sampled tokens
    rollout_logprobs: torch.Tensor | None = None  # float: log p(y) under the policy that sampled y
    teacher_token_logprobs: torch.Tensor | None = None  # float: log q(y), for the weights that need it
    num_items_in_batch: torch.Tensor | float | None = None  # the denominator of "mean" (a scalar)
    sequence_ids: torch.Tensor | None = None  # int64: the sequence each token belongs to (wpkl/inputs/layout.py)
    sequence_bounds: tuple[int, int] | None = None  # a sequence group's (S, L): ids < S, positions in [0, L)

    def given(self) -> tuple[str, ...]:
        """The names of the optional inputs that were given (what decides a call's work and collectives)."""
        return tuple(name for name in _OPTIONAL_BATCH if getattr(self, name) is not None)


_OPTIONAL_BATCH = tuple(f.name for f in dataclasses.fields(TokenBatch) if f.name not in ("valid", "leading_shape",
                                                                                          "packed"))


@dataclass(frozen=True)
class Problem:
    """One loss call: its specification and its inputs, validated (wpkl/inputs/build.py)."""

    spec: LossSpec
    student: StudentLogits | StudentLinear
    teacher: TeacherLogits | TeacherLinear | TeacherLogprobs | TopK
    batch: TokenBatch
    vocab: int  # the student's (local) vocabulary V
    device: torch.device
    shard: object = None  # a vocabulary-parallel call's wpkl.parallel.vocab.VocabShard (None: one device)
    sequences: object = None  # a sequence-parallel call's wpkl.parallel.sequence.SequenceShards

    def replace(self, **changes) -> Problem:
        return dataclasses.replace(self, **changes)

    @property
    def linear(self) -> bool:
        return isinstance(self.student, StudentLinear)

    @property
    def global_vocab(self) -> int:
        """The whole vocabulary (token ids and top-k ids are global ids)."""
        return self.vocab if self.shard is None else self.shard.vocab

    # The teacher as the vocabulary passes take it (wpkl/backends): logits, top-k atoms or None, and log q(y).
    @property
    def teacher_logits(self) -> torch.Tensor | None:
        return self.teacher.logits if isinstance(self.teacher, TeacherLogits) else None

    @property
    def teacher_topk(self) -> TopK | None:
        return self.teacher if isinstance(self.teacher, TopK) else None

    @property
    def teacher_logprobs(self) -> torch.Tensor | None:
        return self.teacher.logprobs if isinstance(self.teacher, TeacherLogprobs) else None

    @property
    def has_distribution(self) -> bool:
        """Whether the teacher gives a distribution (confidence, entropy), not only log q(y)."""
        return not isinstance(self.teacher, TeacherLogprobs)
