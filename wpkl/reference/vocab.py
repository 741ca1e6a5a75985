"""Per-row sums, maxima and gathers over the vocabulary, on one device or on one rank's slice of it.

Every vocabulary sum of the per-token math is additive over slices of the vocabulary once the log-normalizers are global, and
the confidence is a max. So the same functions run on one rank's slice of a vocabulary-parallel (tensor-
parallel) model when (1) the log-normalizer is the global one and (2) each per-row sum or max over the slice is
combined over the ranks. ``shard`` below is that combination (wpkl/parallel/vocab.py: ``VocabShard``), or
None on one device, where every helper is the plain operation. A shard provides Megatron's pair of
conjugate operators, so that autograd gives each rank its slice's gradient:

    offset          the global id of the slice's first column
    sum(x)          x summed over the ranks; backward: the identity. Turns per-rank parts into a value every
                    rank holds (and computes the same loss from)
    copy(x)         the identity; backward: the gradient summed over the ranks. Where a value every rank holds
                    (the log-normalizer) enters per-rank work (log p of the slice), each rank's part of its
                    gradient is added up
    max(x)          x's maximum over the ranks (no gradient)
"""

from __future__ import annotations

import torch



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

