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


def log_probs(student_logits, teacher_logits, temperature=1.0):
    """log_softmax of student / T and teacher[..., :V] / T in the compute dtype (the teacher detached)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s = student_logits.to(dtype)
    u = teacher_logits[..., : student_logits.shape[-1]].detach().to(dtype)
    if temperature != 1.0:
        s, u = s / temperature, u / temperature
    return torch.log_softmax(s, dim=-1), torch.log_softmax(u, dim=-1)


def token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tokens: torch.Tensor | None = None,
    stats: bool = True,
) -> TokenTerms:
    """Per-row terms for student logits [..., V] and teacher logits [..., V_t >= V] (first V used).

    ``stats=False`` skips the confidence and entropies (returned as None) when only the loss is needed.
    """
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    log_p, log_q = log_probs(student_logits, teacher_logits, temperature)
    p = log_p.exp()
    q = log_q.exp() if stats or divergence in ("forward_kl", "jsd") else None

    if divergence == "sampled":
        index = tokens.long().unsqueeze(-1)
        log_p_y = log_p.gather(-1, index).squeeze(-1)
        div = log_p_y - log_q.gather(-1, index).squeeze(-1)
        loss = div.detach() * log_p_y  # -a * log p(y) with a = -D held constant
    elif divergence == "reverse_kl":
        div = loss = kl(p, log_p, log_q)
    elif divergence == "forward_kl":
        div = loss = kl(q, log_q, log_p)
    elif divergence == "jsd":
        m = (1 - beta) * p + beta * q
        log_m = torch.where(m > 0, m, 1.0).log()
        div = loss = beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")

    if not stats:
        return TokenTerms(loss, div.detach(), None, None, None)
    with torch.no_grad():
        return TokenTerms(
            loss=loss,
            divergence=div.detach(),
            confidence=log_q.amax(dim=-1).exp(),
            student_entropy=entropy(p, log_p),
            teacher_entropy=entropy(q, log_q),
        )
