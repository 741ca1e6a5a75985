"""Hypothesis strategies for on-policy distillation batches, for property tests of a loss (wpkl's own use them):

    from hypothesis import given
    from wpkl.testing import strategies as opd

    @given(batch=opd.batches())
    def test_my_loss_is_nonnegative(batch):
        assert my_loss(batch.student, batch.teacher, batch.mask) >= 0

Logits are float64 (round them to the dtype under test), finite unless ``banned`` asks for -inf columns shared
by both sides; vocabularies are small and odd by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st


@dataclass(frozen=True)
class OPDBatch:
    student: torch.Tensor  # [B, T, V] float64
    teacher: torch.Tensor  # [B, T, V_t >= V] float64
    mask: torch.Tensor  # [B, T] bool
    positions: torch.Tensor  # [B, T] int64: each token's position among its sequence's valid tokens


def _tensor(draw, shape, low, high):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64) * (high - low) + low


@st.composite
def logits_pairs(draw, leading=None, max_vocab: int = 97, max_teacher_pad: int = 8, scale: float = 10.0,
                 close: bool | None = None, banned: bool = False):
    """(student [*leading, V], teacher [*leading, V_t]) float64; ``close``: the teacher a small perturbation of the
    student (None: either); ``banned``: some columns -inf on both sides."""
    if leading is None:
        leading = (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    V = draw(st.integers(1, max_vocab))
    pad = draw(st.integers(0, max_teacher_pad))
    student = _tensor(draw, (*leading, V), -scale, scale)
    teacher = _tensor(draw, (*leading, V + pad), -scale, scale)
    if close if close is not None else draw(st.booleans()):
        teacher[..., :V] = student + _tensor(draw, (*leading, V), -1e-2, 1e-2)
    if banned and V > 1:
        columns = draw(st.lists(st.integers(0, V - 1), min_size=1, max_size=V - 1, unique=True))
        student[..., columns] = float("-inf")
        teacher[..., columns] = float("-inf")
    return student, teacher


@st.composite
def masks(draw, leading):
    """Bool masks of the leading shape, fully masked rows and all-masked batches included."""
    kind = draw(st.sampled_from(["random", "all", "none", "prefix"]))
    if kind == "all":
        return torch.ones(leading, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(leading, dtype=torch.bool)
    if kind == "prefix":  # a prompt, then the response
        start = draw(st.integers(0, leading[-1]))
        mask = torch.zeros(leading, dtype=torch.bool)
        mask[..., start:] = True
        return mask
    return _tensor(draw, leading, 0.0, 1.0) < draw(st.floats(0.1, 0.9))


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its sequence's valid tokens (0 on masked ones)."""
    return torch.where(mask, mask.long().cumsum(-1) - 1, 0)


@st.composite
def topk_teachers(draw, leading, vocab: int, max_k: int = 8, pad: bool = True):
    """(ids int64 [*leading, K], log-probs float64 [*leading, K]): distinct ids per token (-1 pads the end of a
    shorter list when ``pad``), log-probabilities of a distribution over the vocabulary (so their mass is <= 1)."""
    K = draw(st.integers(1, max(1, min(max_k, vocab))))
    n = int(torch.tensor(leading).prod())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    logprobs, ids = torch.log_softmax(logits, -1).topk(K, dim=-1)
    if pad and K > 1:
        keep = draw(st.integers(1, K))
        ids[:, keep:] = -1
        logprobs[:, keep:] = 0.0
    return ids.view(*leading, K), logprobs.view(*leading, K)


@st.composite
def batches(draw, max_vocab: int = 97, banned: bool = False):
    """A whole OPD batch: logits pair, mask and positions."""
    leading = (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    student, teacher = draw(logits_pairs(leading, max_vocab=max_vocab, banned=banned))
    mask = draw(masks(leading))
    return OPDBatch(student, teacher, mask, positions_of(mask))
