"""The per-token distributions and divergences (the types every layer passes around, and the math of one row).

See wpkl/reference/__init__.py for the whole specification."""

from __future__ import annotations

from typing import NamedTuple

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")


class TopK(NamedTuple):
    """A teacher given as top-k atoms per token: ids [..., K] (-1 pads) and their log-probabilities [..., K]."""

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __getitem__(self, rows):  # the same rows of both
        if isinstance(rows, int):  # NamedTuple field access stays positional
            return tuple.__getitem__(self, rows)
        return TopK(self.ids[rows], self.logprobs[rows])


class TopKOptions(NamedTuple):
    mode: str = "tail"
    logprob_floor: float | None = None
    loss_max: float | None = None


class TokenTerms(NamedTuple):
    """Per-token results of the vocabulary pass, each of the rows' leading shape.

    ``loss`` carries the gradient with respect to the student logits; the rest are detached.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    confidence: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor


def exact_divergence(divergence: str, beta: float) -> str:
    """jsd with beta 0 or 1 is exactly forward or reverse KL (0 log 0 = 0 on the other side): the divergence that
    computes it (the kernels run that cheaper specialization too)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def sampled_multiplier(behaviour: torch.Tensor, log_q_y: torch.Tensor, power: float | None) -> torch.Tensor:
    """The constant -a that multiplies log p(y) in the "sampled" loss ``L = -a log p(y)``.

    power None: -a = log p(y) - log q(y) (the single-sample reverse-KL policy gradient; ``behaviour`` is log p(y)
    of the policy that sampled y). PowerOPD (arXiv 2606.17199, Eq. for its reward r = q(y)^alpha - p(y)^alpha;
    its code, EIT-NLP/PowerOPD, uses alpha = 5 and no 1/alpha): -a = p(y)^power - q(y)^power, so that
    ``L = -r log p(y)``.
    """
    if power is None:
        return behaviour - log_q_y
    return torch.exp(power * behaviour) - torch.exp(power * log_q_y)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: half-precision inputs accumulate in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kl(prob: torch.Tensor, log_prob: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """KL(prob || other) = sum_j prob_j (log prob_j - log other_j), with 0 * log(0 / x) = 0.

    Where prob_j == 0 the log-ratio may be -inf - -inf = NaN (a token both ban) or -inf; the ``where`` makes
    that term an exact 0 in value and gradient, while a NaN probability still propagates.
    """
    log_ratio = torch.where(prob != 0, log_prob - log_other, 0.0)
    return (prob * log_ratio).sum(dim=-1)


def entropy(prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """-sum_j prob_j log prob_j, with 0 log 0 = 0."""
    return -(prob * torch.where(prob != 0, log_prob, 0.0)).sum(dim=-1)


def divergence_between(divergence: str, beta: float, p, log_p, q, log_q) -> torch.Tensor:
    """The divergence of two distributions given over the last dimension (a vocabulary, or top-k atoms)."""
    if divergence == "reverse_kl":
        return kl(p, log_p, log_q)
    if divergence == "forward_kl":
        return kl(q, log_q, log_p)
    if divergence == "jsd":
        m = (1 - beta) * p + beta * q
        log_m = torch.where(m > 0, m, 1.0).log()
        return beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")

