"""The torch vocabulary pass: the specification (wpkl/reference) over chunks of rows, with triton_pass.py's
contract. It works on any device torch supports and never holds more than a few [chunk, V] buffers in the compute
dtype (float32, or float64 for float64 input) besides the gradient.

``forward(..., row_grad=)`` also writes d L_i / d student (coefficient 1 per row) while its chunk is at hand:
callers that know the coefficients only later scale rows instead of recomputing (wpkl/engine/terms.py does so
for float32/float64 logits). Otherwise backward recomputes each chunk under autograd (activation checkpointing,
chunk by chunk). Rows are read in place (a view) when a chunk's valid tokens are consecutive in one sequence,
and gathered otherwise; masked tokens are never read. ``stats=False`` in the spec's sense (``LossSpec.needs_stats``
false) skips the teacher confidence and the entropies (NaN then).

``reference_terms`` is the specification itself as a backend: all valid rows at once under plain autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import TopK, TokenTerms, compute_dtype, teacher_token_logprob, token_terms
from ..spec import LossSpec


# Rows per chunk = CHUNK_ELEMENTS // V: with 2**20 elements a float32 [chunk, V] buffer is 4 MiB. Measured on a
# 2-core CPU at N=2048, V=32000 (fwd+bwd): 2**16 pays per-op overhead (3.6x eager torch), 2**18 1.3x,
# 2**20 and 2**22 0.7x.
CHUNK_ELEMENTS = 1 << 20


def row_chunks(valid: torch.Tensor, vocab: int):
    """Index tuples for the valid (b, t) tokens, at most CHUNK_ELEMENTS // V rows each: ``(b, slice)`` (a view)
    when the rows are consecutive in one sequence, else a pair of index tensors (a gather)."""
    b, t = valid.nonzero(as_tuple=True)  # one host sync: the torch pass is not the fast path
    b_host, t_host = b.tolist(), t.tolist()
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, len(b_host), step):
        stop = min(start + step, len(b_host))
        first, last = start, stop - 1
        if b_host[first] == b_host[last] and t_host[last] - t_host[first] == last - first:
            yield b_host[first], slice(t_host[first], t_host[last] + 1)
        else:
            yield b[start:stop], t[start:stop]


def _select(x: torch.Tensor | None, rows):
    return None if x is None else x[rows]


def _rows(rows, teacher, tokens, teacher_logprobs, rollout_logprobs) -> dict:
    """The per-row inputs of token_terms for the selected rows (``teacher``: logits, a ``TopK`` or None)."""
    topk = isinstance(teacher, TopK)
    return dict(teacher_logits=None if topk else _select(teacher, rows),
                teacher_topk=teacher[rows] if topk else None, tokens=_select(tokens, rows),
                teacher_logprobs=_select(teacher_logprobs, rows), rollout_logprobs=_select(rollout_logprobs, rows))


def _options(spec: LossSpec, shard) -> dict:
    """token_terms' options from the spec."""
    return dict(divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature, topk=spec.topk, shard=shard,
                power=spec.sampled_power)


@dataclass
class TorchSaved:
    """What backward needs (``student``/``teacher`` may be dropped and attached again, as in TritonSaved)."""

    student: torch.Tensor | None
    teacher: object  # logits, a TopK or None
    valid: torch.Tensor
    tokens: torch.Tensor | None
    teacher_logprobs: torch.Tensor | None
    rollout_logprobs: torch.Tensor | None
    spec: LossSpec
    shard: object = None

    def per_row(self):
        return self.teacher, self.tokens, self.teacher_logprobs, self.rollout_logprobs


class TorchPass:
    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec, shard=None,
                row_grad: torch.Tensor | None = None):
        B, T, V = student.shape
        dtype = compute_dtype(*(x for x in (student, teacher) if isinstance(x, torch.Tensor)))
        loss = student.new_zeros((B, T), dtype=dtype)
        stats = student.new_zeros((4, B, T), dtype=dtype)
        needs_stats = spec.needs_stats
        if not needs_stats:
            stats[1:] = float("nan")  # not computed: confidence and entropies unknown
        saved = TorchSaved(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec, shard)
        options = _options(spec, shard)
        for rows in row_chunks(valid, V):
            x = student[rows].detach()
            with torch.enable_grad():
                if row_grad is not None:
                    x.requires_grad_(True)
                terms = token_terms(x, **_rows(rows, *saved.per_row()), stats=needs_stats, **options)
                if row_grad is not None:
                    (row_grad[rows],) = torch.autograd.grad(terms.loss.sum(), x)
            loss[rows] = terms.loss.detach()
            stats[0][rows] = terms.divergence
            if needs_stats:
                for k, value in enumerate(terms[2:], start=1):
                    stats[k][rows] = value
        return loss, stats, saved

    @staticmethod
    def backward(saved: TorchSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Recomputes each chunk under autograd; rows of masked tokens are zeroed."""
        options = _options(saved.spec, saved.shard)
        out[~saved.valid] = 0
        for rows in row_chunks(saved.valid, saved.student.shape[-1]):
            x = saved.student[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                terms = token_terms(x, **_rows(rows, *saved.per_row()), stats=False, **options)
                c = coef[rows].to(terms.loss.dtype)
                (grad,) = torch.autograd.grad(terms.loss, x, c)
                out[rows] = torch.where(c[..., None] != 0, grad, 0.0)  # a row at weight 0 is 0, whatever its terms
        return out


def reference_terms(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec,
                    shard=None) -> TokenTerms:
    """The specification as a backend: token_terms on the valid rows, all at once, plain autograd."""
    b, t = valid.nonzero(as_tuple=True)
    terms = token_terms(student[b, t], **_rows((b, t), teacher, tokens, teacher_logprobs, rollout_logprobs),
                        **_options(spec, shard))
    zeros = student.new_zeros(valid.shape, dtype=terms.loss.dtype)
    return TokenTerms(*(zeros.index_put((b, t), x) for x in terms))


@torch.no_grad()
def chunked_teacher_token_logprobs(teacher, valid, tokens, temperature, vocab, shard=None) -> torch.Tensor:
    """[B, T] log q(y) of the sampled tokens from the teacher logits, chunk by chunk (0 where invalid).

    A second read of the teacher's valid rows, for the weightings that need log q(y) when it is not given.
    """
    out = torch.zeros(valid.shape, dtype=compute_dtype(teacher), device=valid.device)
    for rows in row_chunks(valid, vocab):
        out[rows] = teacher_token_logprob(teacher[rows], tokens[rows], vocab, temperature, shard)
    return out
