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


# ------------------------------------------------------------------------------- vocabulary shards
#
# Every vocabulary sum above is additive over slices of the vocabulary once the log-normalizers are global, and
# the confidence is a max. So the same functions run on one rank's slice of a vocabulary-parallel (tensor-
# parallel) model when (1) the log-normalizer is the global one and (2) each per-row sum or max over the slice is
# combined over the ranks. ``shard`` below is that combination (wpkl/tensor_parallel.py: ``VocabShard``), or
# None on one device, where every helper is the plain operation. A shard provides Megatron's pair of
# conjugate operators, so that autograd gives each rank its slice's gradient:
#
#     offset          the global id of the slice's first column
#     sum(x)          x summed over the ranks; backward: the identity. Turns per-rank parts into a value every
#                     rank holds (and computes the same loss from)
#     copy(x)         the identity; backward: the gradient summed over the ranks. Where a value every rank holds
#                     (the log-normalizer) enters per-rank work (log p of the slice), each rank's part of its
#                     gradient is added up
#     max(x)          x's maximum over the ranks (no gradient)


def vocab_sum(*xs: torch.Tensor, shard=None):
    """Per-row sums over the vocabulary, given this slice's parts: the whole vocabulary's (several tensors of one
    shape: one collective). One tensor in, one out; several in, a tuple out."""
    if shard is not None:
        xs = shard.sum(torch.stack(xs)).unbind(0) if len(xs) > 1 else (shard.sum(xs[0]),)
    return xs[0] if len(xs) == 1 else tuple(xs)


def vocab_max(x: torch.Tensor, shard=None) -> torch.Tensor:
    return x if shard is None else shard.max(x)


def vocab_logsumexp(*xs: torch.Tensor, shard=None):
    """logsumexp over the last dimension (the whole vocabulary's with a shard: one collective for the maxima,
    one for the sums, whatever the number of tensors). One tensor in, one out; several in, a tuple out."""
    if shard is None:
        out = tuple(torch.logsumexp(x, dim=-1) for x in xs)
    else:
        m = vocab_max(torch.stack([x.detach().amax(dim=-1) for x in xs]), shard)
        m = torch.where(torch.isfinite(m), m, 0.0).unbind(0)
        sums = vocab_sum(*((x - m_x.unsqueeze(-1)).exp().sum(dim=-1) for x, m_x in zip(xs, m, strict=True)),
                         shard=shard)
        sums = sums if len(xs) > 1 else (sums,)
        out = tuple(m_x + z.log() for m_x, z in zip(m, sums, strict=True))
    return out[0] if len(xs) == 1 else out


def owned_values(x: torch.Tensor, ids: torch.Tensor, shard) -> torch.Tensor:
    """x[..., ids] for the global ids [..., K] this slice holds, 0 for the others (and for padding, ids < 0)."""
    local = ids.long() - shard.offset
    owned = (local >= 0) & (local < x.shape[-1]) & (ids >= 0)
    return torch.where(owned, x.gather(-1, local.clamp(0, x.shape[-1] - 1)), 0.0)


def gather_ids(x: torch.Tensor, ids: torch.Tensor, shard=None) -> torch.Tensor:
    """x[..., ids] for global vocabulary ids [..., K] (ids < 0, padding, read column 0: mask them). With a shard,
    the rank that owns an id supplies its value and the others 0."""
    if shard is None:
        return x.gather(-1, ids.long().clamp_min(0))
    return vocab_sum(owned_values(x, ids, shard), shard=shard)


def log_probs(logits: torch.Tensor, vocab: int, dtype: torch.dtype, temperature: float = 1.0, shard=None,
              teacher: torch.Tensor | None = None):
    """log_softmax(logits[..., :V] / T) in the compute dtype (with a shard: the slice's, normalized globally).

    With ``teacher`` (detached; may be None), the pair (student's, teacher's), normalized together (with a
    shard: the two normalizers share their collectives)."""
    def scaled(z):
        x = z[..., :vocab].to(dtype)
        return x / temperature if temperature != 1.0 else x

    xs = [scaled(logits)] + ([] if teacher is None else [scaled(teacher.detach())])
    if shard is None:
        out = [torch.log_softmax(x, dim=-1) for x in xs]
    else:
        lse = vocab_logsumexp(*xs, shard=shard)
        lse = lse if len(xs) > 1 else (lse,)
        out = [xs[0] - shard.copy(lse[0]).unsqueeze(-1)]  # the teacher's: no gradient (its sum shares the stack)
        out += [x - n.detach().unsqueeze(-1) for x, n in zip(xs[1:], lse[1:], strict=True)]
    return out[0] if len(out) == 1 else tuple(out)


def token_logprob(log_p: torch.Tensor, tokens: torch.Tensor, shard=None, log_q: torch.Tensor | None = None):
    """log p(y) of the sampled tokens y (global ids) from log-probabilities [..., V]; with ``log_q``, the pair
    (log p(y), log q(y)) (with a shard: one collective)."""
    index = tokens.long().unsqueeze(-1)
    tables = [log_p] + ([] if log_q is None else [log_q])
    if shard is None:
        out = [x.gather(-1, index).squeeze(-1) for x in tables]
        return out[0] if len(out) == 1 else tuple(out)
    return vocab_sum(*(owned_values(x, index, shard).squeeze(-1) for x in tables), shard=shard)


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
) -> TokenTerms:
    """Per-row terms for student logits [..., V] and teacher logits [..., V_t >= V] (first V used).

    ``teacher_logits`` may be None for "sampled" when ``teacher_logprobs`` holds log q(y); the teacher
    confidence and entropy are then unknown (NaN). With ``teacher_topk`` (and no teacher logits) the teacher is
    top-k atoms (``topk_terms``). ``stats=False`` skips the confidence and entropies (returned as None) when only
    the loss is needed.

    ``shard``: the logits are one rank's slice of a vocabulary split over ranks (the section above; then
    ``tokens`` and top-k ids are global ids, and a teacher's slice is the student's): the terms are the whole
    vocabulary's, the same on every rank, and the loss's gradient is the slice's.
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
        div = behaviour - log_q_y  # = -a, a constant
        loss = div * log_p_y  # -a * log p(y)
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


# ---------------------------------------------------------------------------------------------- top-k teachers

TOPK_MODES = ("tail", "renormalize", "raw")
# TRL's _add_tail_bucket (trl/experimental/iw_opd/iw_opd_trainer.py): the atoms' log-mass is clamped at -1e-7, so the
# tail atom's log-probability is at least log(1 - exp(-1e-7)) ~ -16.1 and never -inf.
TAIL_LOG_MASS_MAX = -1e-7


def tail_log_prob(log_atoms: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(log_atoms_j)) over the last dimension, stably (log1p of -expm1), TRL's clamp included."""
    log_mass = torch.logsumexp(log_atoms, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_MAX)
    return torch.log(-torch.expm1(log_mass))


def topk_atom_terms(x, lse, atoms, teacher_logprobs, *, mode, divergence, beta, logprob_floor=None, loss_max=None,
                    stats=True):
    """The divergence over top-k atoms, from the student's scaled logits x = s_j at the K ids (s = logits / T) and
    its log-normalizer lse over the full vocabulary: log p_j = x_j - lse.

    ``atoms``: bool [..., K], False at padding (id -1). ``teacher_logprobs``: the teacher's full-vocabulary log q_j
    of the same ids, used as given (no temperature). Modes (wpkl/api.py documents them):

        tail         atoms S plus one tail atom with log(1 - sum_S p_j), the same for q (TRL's convention)
        renormalize  both restricted to S and renormalized
        raw          the atoms as given: forward KL is sum_S q_j (log q_j - log p_j), verl's top-k forward KL;
                     ``logprob_floor`` clamps both sides' log-probabilities from below (verl's log_prob_min_clamp)

    Returns (L, D, confidence, teacher entropy): L = min(D, loss_max) when ``loss_max`` is given (verl's
    loss_max_clamp; zero gradient where it clamps), else D. Confidence is max_j q_j over the given atoms; the
    teacher entropy is over the mode's atoms (a support estimate). Rows with no atom give D = 0. Differentiable
    in x and lse (the kernels use autograd of this function for their gradient's per-row coefficients).
    """
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    log_p = torch.where(atoms, x - lse.unsqueeze(-1), neg_inf)
    log_q = torch.where(atoms, teacher_logprobs.to(x.dtype), neg_inf)
    if mode == "raw" and logprob_floor is not None:
        log_p = torch.where(atoms, log_p.clamp_min(logprob_floor), neg_inf)
        log_q = torch.where(atoms, log_q.clamp_min(logprob_floor), neg_inf)
    if mode == "tail":
        log_p = torch.cat([log_p, tail_log_prob(log_p)], dim=-1)
        log_q = torch.cat([log_q, tail_log_prob(log_q)], dim=-1)
    elif mode == "renormalize":
        any_atom = atoms.any(dim=-1, keepdim=True)
        log_p = torch.where(atoms, log_p - torch.where(any_atom, torch.logsumexp(log_p, -1, keepdim=True), 0.0), neg_inf)
        log_q = torch.where(atoms, log_q - torch.where(any_atom, torch.logsumexp(log_q, -1, keepdim=True), 0.0), neg_inf)
    elif mode != "raw":
        raise ValueError(f"unknown topk_mode {mode!r}; expected one of {TOPK_MODES}")
    p, q = log_p.exp(), log_q.exp()
    div = divergence_between(divergence, beta, p, log_p, q, log_q)
    loss = div if loss_max is None else div.clamp(max=loss_max)
    if not stats:
        return loss, div.detach(), None, None
    with torch.no_grad():
        confidence = torch.where(atoms, teacher_logprobs.to(x.dtype), neg_inf).amax(dim=-1).exp()
        return loss, div.detach(), confidence, entropy(q, log_q)


def topk_terms(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    mode: str = "tail",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    logprob_floor: float | None = None,
    loss_max: float | None = None,
    stats: bool = True,
    shard=None,
) -> TokenTerms:
    """Per-row terms against a teacher given as top-k atoms (ids [..., K], -1 pads; log q of those ids).

    ``shard``: as in ``token_terms`` (the ids are global; each rank supplies the student logits of the ids it
    holds)."""
    divergence = exact_divergence(divergence, beta)
    dtype = compute_dtype(student_logits)
    s = student_logits.to(dtype)
    s = s / temperature if temperature != 1.0 else s
    lse = vocab_logsumexp(s, shard=shard)
    atoms = topk_ids >= 0
    x = gather_ids(s, topk_ids, shard)
    loss, div, confidence, teacher_entropy = topk_atom_terms(
        x, lse, atoms, topk_logprobs, mode=mode, divergence=divergence, beta=beta, logprob_floor=logprob_floor,
        loss_max=loss_max, stats=stats)
    if not stats:
        return TokenTerms(loss, div, None, None, None)
    with torch.no_grad():
        log_p = s - lse.unsqueeze(-1)
        return TokenTerms(loss, div, confidence, vocab_sum(entropy(log_p.exp(), log_p), shard=shard),
                          teacher_entropy)
