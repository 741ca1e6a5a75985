"""token_terms: the per-token terms of one row of student logits against a teacher (logits, log q(y), or
top-k atoms).
"""

from __future__ import annotations

import torch

from .core import (TokenTerms, TopK, TopKOptions, compute_dtype, divergence_between, entropy, exact_divergence,
                   sampled_multiplier)
from .topk import topk_terms
from .vocab import log_probs, token_logprob, vocab_max, vocab_sum


def teacher_token_logprob(teacher_logits: torch.Tensor, tokens: torch.Tensor, vocab: int,
                          temperature: float = 1.0, shard=None) -> torch.Tensor:
    """log q(y) = log_softmax(teacher[..., :V] / T)[y] of the sampled tokens y (for weights that need it)."""
    log_q = log_probs(teacher_logits.detach(), vocab, compute_dtype(teacher_logits), temperature, shard)
    return token_logprob(log_q, tokens, shard)


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
    teacher_topk: TopK | None = None,
    topk: TopKOptions | None = None,
    stats: bool = True,
    shard=None,
    power: float | None = None,
) -> TokenTerms:
    """Per-row terms for student logits [..., V] and teacher logits [..., V_t >= V] (first V used).

    ``teacher_logits`` may be None for "sampled" when ``teacher_logprobs`` holds log q(y); the teacher
    confidence and entropy are then unknown (NaN). With ``teacher_topk`` (and no teacher logits) the teacher is
    top-k atoms (``topk_terms``). ``stats=False`` skips the confidence and entropies (returned as None) when only
    the loss is needed.

    ``shard``: the logits are one rank's slice of a vocabulary split over ranks (the section above; then
    ``tokens`` and top-k ids are global ids, and a teacher's slice is the student's): the terms are the whole
    vocabulary's, the same on every rank, and the loss's gradient is the slice's.

    ``power``: "sampled" with PowerOPD's advantage (``sampled_multiplier``); the divergence stays the log-ratio.
    """
    if teacher_topk is not None:
        topk = topk or TopKOptions()
        return topk_terms(student_logits, teacher_topk.ids, teacher_topk.logprobs, mode=topk.mode,
                          divergence=divergence, beta=beta, temperature=temperature,
                          logprob_floor=topk.logprob_floor, loss_max=topk.loss_max, stats=stats, shard=shard)
    divergence = exact_divergence(divergence, beta)
    vocab = student_logits.shape[-1]
    dtype = compute_dtype(*(t for t in (student_logits, teacher_logits) if t is not None))
    if teacher_logits is None:
        log_p, log_q = log_probs(student_logits, vocab, dtype, temperature, shard), None
    else:
        log_p, log_q = log_probs(student_logits, vocab, dtype, temperature, shard, teacher=teacher_logits)
    p = log_p.exp()
    q = log_q.exp() if log_q is not None and (stats or divergence in ("forward_kl", "jsd")) else None

    if divergence == "sampled":
        if teacher_logprobs is None:
            log_p_y, log_q_y = token_logprob(log_p, tokens, shard, log_q=log_q)
        else:
            log_p_y, log_q_y = token_logprob(log_p, tokens, shard), teacher_logprobs.to(dtype)
        behaviour = log_p_y.detach() if rollout_logprobs is None else rollout_logprobs.to(dtype)
        div = behaviour - log_q_y
        loss = sampled_multiplier(behaviour, log_q_y, power).detach() * log_p_y  # -a * log p(y), a constant
    else:
        div = loss = vocab_sum(divergence_between(divergence, beta, p, log_p, q, log_q), shard=shard)

    if not stats:
        return TokenTerms(loss, div.detach(), None, None, None)
    with torch.no_grad():
        unknown = torch.full_like(div, float("nan"))
        if log_q is None:
            return TokenTerms(loss, div.detach(), unknown, vocab_sum(entropy(p, log_p), shard=shard), unknown)
        student_entropy, teacher_entropy = vocab_sum(entropy(p, log_p), entropy(q, log_q), shard=shard)
        return TokenTerms(
            loss=loss,
            divergence=div.detach(),
            confidence=vocab_max(log_q.amax(dim=-1), shard).exp(),
            student_entropy=student_entropy,
            teacher_entropy=teacher_entropy,
        )

