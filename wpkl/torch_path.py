"""The torch backends: "torch", the reference math over chunks of rows with recompute in backward, and
"reference", the same math on all valid rows at once under plain autograd.

The chunked path works on any device torch supports. Peak extra memory is a few [chunk, V] buffers in the compute dtype
(float32, or float64 for float64 input) plus the [B, T, V] gradient, never several [N, V] float32
tensors: forward keeps only per-token results, and backward recomputes each chunk under autograd
(activation checkpointing, chunk by chunk). Masked tokens are never read.
"""

from __future__ import annotations

import torch

from .reference import TokenTerms, compute_dtype, teacher_token_logprob, token_terms

# Rows per chunk = CHUNK_ELEMENTS // V: with 2**22 elements a float32 [chunk, V] buffer is 16 MiB.
CHUNK_ELEMENTS = 1 << 22


def _chunks(valid: torch.Tensor, vocab: int):
    """(b, t) index pairs of the valid tokens, in chunks of at most CHUNK_ELEMENTS // V rows."""
    b, t = valid.nonzero(as_tuple=True)  # one host sync: the torch path is not the hot path
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, b.numel(), step):
        yield b[start : start + step], t[start : start + step]


def _select(x: torch.Tensor | None, b: torch.Tensor, t: torch.Tensor):
    return None if x is None else x[b, t]


def _rows(b, t, teacher, tokens, teacher_logprobs, rollout_logprobs) -> dict:
    """The per-row inputs of token_terms for the (b, t) rows."""
    return dict(teacher_logits=_select(teacher, b, t), tokens=_select(tokens, b, t),
                teacher_logprobs=_select(teacher_logprobs, b, t), rollout_logprobs=_select(rollout_logprobs, b, t))


class ChunkedTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence: str,
                beta: float, temperature: float):
        B, T, V = student.shape
        dtype = compute_dtype(*(x for x in (student, teacher) if x is not None))
        loss = student.new_zeros((B, T), dtype=dtype)
        stats = student.new_zeros((4, B, T), dtype=dtype)
        options = dict(divergence=divergence, beta=beta, temperature=temperature)
        per_row = (teacher, tokens, teacher_logprobs, rollout_logprobs)
        for b, t in _chunks(valid, V):
            terms = token_terms(student[b, t], **_rows(b, t, *per_row), **options)
            loss[b, t] = terms.loss
            stats[:, b, t] = torch.stack(terms[1:])
        ctx.save_for_backward(student, valid, *per_row)
        ctx.options = options
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        student, valid, *per_row = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for b, t in _chunks(valid, student.shape[-1]):
            rows = student[b, t].detach().requires_grad_(True)
            with torch.enable_grad():
                terms = token_terms(rows, **_rows(b, t, *per_row), stats=False, **ctx.options)
                (grad_rows,) = torch.autograd.grad(terms.loss, rows, grad_loss[b, t].to(terms.loss.dtype))
            grad[b, t] = grad_rows
        return grad, None, None, None, None, None, None, None, None


def chunked_terms(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence, beta,
                  temperature) -> TokenTerms:
    loss, stats = ChunkedTokenDivergence.apply(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs,
                                               divergence, beta, temperature)
    return TokenTerms(loss, *stats.unbind(0))


def reference_terms(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence, beta,
                    temperature) -> TokenTerms:
    """The specification as a backend: token_terms on the valid rows, all at once, plain autograd."""
    b, t = valid.nonzero(as_tuple=True)
    terms = token_terms(student[b, t], **_rows(b, t, teacher, tokens, teacher_logprobs, rollout_logprobs),
                        divergence=divergence, beta=beta, temperature=temperature)
    zeros = student.new_zeros(valid.shape, dtype=terms.loss.dtype)
    return TokenTerms(*(zeros.index_put((b, t), x) for x in terms))


@torch.no_grad()
def chunked_teacher_token_logprobs(teacher, valid, tokens, temperature, vocab) -> torch.Tensor:
    """[B, T] log q(y) of the sampled tokens from the teacher logits, chunk by chunk (0 where invalid).

    A second read of the teacher's valid rows: weights that need log q(y) cost this on the torch path only.
    """
    out = torch.zeros(valid.shape, dtype=compute_dtype(teacher), device=valid.device)
    for b, t in _chunks(valid, vocab):
        out[b, t] = teacher_token_logprob(teacher[b, t], tokens[b, t], vocab, temperature)
    return out
