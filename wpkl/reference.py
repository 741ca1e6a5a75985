"""The specification: wpkl's per-token math in plain, readable torch.

This module defines what every backend computes for one token (one row of logits). It materializes
log-softmax over the whole vocabulary, runs in float64 when given float64, and lets autograd do the
gradient, so it is the yardstick the fused kernels are tested against.

With temperature T, s = student / T and u = teacher[..., :V] / T:

    log p = log_softmax(s)  (student)       log q = log_softmax(u)  (teacher, no gradient)

    reverse_kl   D = sum_j p (log p - log q)
    forward_kl   D = sum_j q (log q - log p)
    jsd(beta)    log m = log((1 - beta) p + beta q)
                 D = beta * KL(q || m) + (1 - beta) * KL(p || m)
                 beta = 0 is forward_kl and beta = 1 is reverse_kl exactly (TRL's convention)
    sampled      with y the sampled token and a = log q(y) - log p(y) held constant:
                 L = -a * log p(y) (the on-policy policy-gradient surrogate), D = log p(y) - log q(y)

The per-token loss is L = D for every divergence but "sampled". 0 * log 0 = 0 throughout, so -inf
logits (banned tokens) are legal; a token the teacher bans while the student allows it makes the
reverse KL +inf, as the math says. Alongside L and D each token reports the teacher confidence
c = max_j q_j and the entropies of p and q, for weighting and for auditing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")


class TokenTerms(NamedTuple):
    """Per-token results of the vocabulary pass, each of the rows' leading shape.

    ``loss`` carries the gradient with respect to the student logits; the rest are detached.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    confidence: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: half-precision inputs accumulate in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def expectation(prob: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """sum_j prob_j * value_j over the last dim, with 0 * value = 0 even for infinite or NaN value.

    A NaN probability still propagates. The inner ``where`` keeps autograd from multiplying a zero
    gradient by an infinite value.
    """
    alive = prob != 0
    return torch.where(alive, prob * torch.where(alive, value, 0.0), 0.0).sum(dim=-1)


def kl(prob: torch.Tensor, log_prob: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """KL(prob || other) = sum_j prob_j (log prob_j - log other_j)."""
    return expectation(prob, log_prob - log_other)


def token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tokens: torch.Tensor | None = None,
) -> TokenTerms:
    """Per-row terms for student logits [..., V] and teacher logits [..., V_t >= V] (first V used)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    s = student_logits.to(dtype) / temperature
    u = teacher_logits[..., :vocab].detach().to(dtype) / temperature

    log_p = torch.log_softmax(s, dim=-1)
    log_q = torch.log_softmax(u, dim=-1)
    p, q = log_p.exp(), log_q.exp()

    if divergence == "sampled":
        index = tokens.long().unsqueeze(-1)
        log_p_y = log_p.gather(-1, index).squeeze(-1)
        log_q_y = log_q.gather(-1, index).squeeze(-1)
        div = log_p_y - log_q_y
        loss = div.detach() * log_p_y  # -a * log p(y) with a = -D held constant
    else:
        if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
            div = kl(p, log_p, log_q)
        elif divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
            div = kl(q, log_q, log_p)
        elif divergence == "jsd":
            m = (1 - beta) * p + beta * q
            log_m = torch.where(m > 0, m, 1.0).log()
            div = beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)
        else:
            raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
        loss = div

    return TokenTerms(
        loss=loss,
        divergence=div.detach(),
        confidence=q.amax(dim=-1),
        student_entropy=-expectation(p, log_p).detach(),
        teacher_entropy=-expectation(q, log_q),
    )
