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
                 L = -a * log p(y) (the on-policy policy-gradient surrogate), D = log p(y) - log q(y) = -a.
                 log q(y) may be given directly (teacher_logprobs, e.g. from a teacher server: no teacher
                 logits needed), and log p(y) in a may come from the policy that sampled y (rollout_logprobs,
                 e.g. vLLM's), as in TRL's IW-OPD trainer.

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


def log_probs(logits: torch.Tensor, vocab: int, dtype: torch.dtype, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits[..., :V] / T) in the compute dtype."""
    x = logits[..., :vocab].to(dtype)
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def teacher_token_logprob(teacher_logits: torch.Tensor, tokens: torch.Tensor, vocab: int,
                          temperature: float = 1.0) -> torch.Tensor:
    """log q(y) = log_softmax(teacher[..., :V] / T)[y] of the sampled tokens y (for weights that need it)."""
    log_q = log_probs(teacher_logits.detach(), vocab, compute_dtype(teacher_logits), temperature)
    return log_q.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    *,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tokens: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    stats: bool = True,
) -> TokenTerms:
    """Per-row terms for student logits [..., V] and teacher logits [..., V_t >= V] (first V used).

    ``teacher_logits`` may be None for "sampled" when ``teacher_logprobs`` holds log q(y); the teacher
    confidence and entropy are then unknown (NaN). ``stats=False`` skips the confidence and entropies
    (returned as None) when only the loss is needed.
    """
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    vocab = student_logits.shape[-1]
    dtype = compute_dtype(*(t for t in (student_logits, teacher_logits) if t is not None))
    log_p = log_probs(student_logits, vocab, dtype, temperature)
    log_q = None if teacher_logits is None else log_probs(teacher_logits.detach(), vocab, dtype, temperature)
    p = log_p.exp()
    q = log_q.exp() if log_q is not None and (stats or divergence in ("forward_kl", "jsd")) else None

    if divergence == "sampled":
        index = tokens.long().unsqueeze(-1)
        log_p_y = log_p.gather(-1, index).squeeze(-1)
        log_q_y = log_q.gather(-1, index).squeeze(-1) if teacher_logprobs is None else teacher_logprobs.to(dtype)
        behaviour = log_p_y.detach() if rollout_logprobs is None else rollout_logprobs.to(dtype)
        div = behaviour - log_q_y  # = -a, a constant
        loss = div * log_p_y  # -a * log p(y)
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
        unknown = torch.full_like(div, float("nan"))
        return TokenTerms(
            loss=loss,
            divergence=div.detach(),
            confidence=unknown if log_q is None else log_q.amax(dim=-1).exp(),
            student_entropy=entropy(p, log_p),
            teacher_entropy=unknown if log_q is None else entropy(q, log_q),
        )
