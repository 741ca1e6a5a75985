"""The torch backends: "torch", the reference math over chunks of rows, and "reference", the same math on all
valid rows at once under plain autograd.

The chunked path works on any device torch supports. It never holds more than a few [chunk, V] buffers in the
compute dtype (float32, or float64 for float64 input) besides the [B, T, V] gradient:

- float32/float64 logits (the compute dtype): each chunk's gradient d L_i / d logits is computed in the forward
  pass, right after its values, by autograd through the reference math, and written into the gradient buffer;
  backward only scales each row by d loss / d L_i, in place. The gradient buffer is the one backward returns,
  so this costs no memory the gradient does not, and the [chunk, V] math runs once instead of twice.
- bfloat16/float16 logits: storing an unscaled gradient in half precision would round it twice, and storing it
  in float32 would double its memory, so backward recomputes each chunk under autograd instead (activation
  checkpointing, chunk by chunk).

Rows are read in place (a view) when a chunk's valid tokens are consecutive in one sequence, and gathered
otherwise; masked tokens are never read.
"""

from __future__ import annotations

import torch

from .reference import TokenTerms, compute_dtype, teacher_token_logprob, token_terms

# Rows per chunk = CHUNK_ELEMENTS // V: with 2**20 elements a float32 [chunk, V] buffer is 4 MiB. Measured on a
# 2-core CPU at N=2048, V=32000 (fwd+bwd): 2**16 pays per-op overhead (3.6x eager torch), 2**18 1.3x,
# 2**20 and 2**22 0.7x.
CHUNK_ELEMENTS = 1 << 20


def _chunks(valid: torch.Tensor, vocab: int):
    """Index tuples for the valid (b, t) tokens, at most CHUNK_ELEMENTS // V rows each: ``(b, slice)`` (a view)
    when the rows are consecutive in one sequence, else a pair of index tensors (a gather)."""
    b, t = valid.nonzero(as_tuple=True)  # one host sync: the torch path is not the fast path
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
    """The per-row inputs of token_terms for the selected rows."""
    return dict(teacher_logits=_select(teacher, rows), tokens=_select(tokens, rows),
                teacher_logprobs=_select(teacher_logprobs, rows), rollout_logprobs=_select(rollout_logprobs, rows))


class ChunkedTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence: str,
                beta: float, temperature: float, stats: bool):
        B, T, V = student.shape
        dtype = compute_dtype(*(x for x in (student, teacher) if x is not None))
        loss = student.new_zeros((B, T), dtype=dtype)
        out_stats = student.new_zeros((4, B, T), dtype=dtype)
        if not stats:
            out_stats[1:] = float("nan")  # not computed: confidence and entropies unknown
        options = dict(divergence=divergence, beta=beta, temperature=temperature)
        per_row = (teacher, tokens, teacher_logprobs, rollout_logprobs)
        # The gradient now when it needs no memory the returned gradient does not (see the module docstring).
        eager_grad = ctx.needs_input_grad[0] and student.dtype == dtype
        grad = torch.zeros_like(student) if eager_grad else None
        for rows in _chunks(valid, V):
            x = student[rows]
            with torch.enable_grad():
                if eager_grad:
                    x = x.detach().requires_grad_(True)
                terms = token_terms(x, **_rows(rows, *per_row), stats=stats, **options)
                if eager_grad:
                    (grad[rows],) = torch.autograd.grad(terms.loss.sum(), x)
            loss[rows] = terms.loss.detach()
            out_stats[0][rows] = terms.divergence
            if stats:
                for k, value in enumerate(terms[2:], start=1):
                    out_stats[k][rows] = value
        ctx.eager_grad = eager_grad
        if eager_grad:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(student, valid, *per_row)
        ctx.options = options
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        if ctx.eager_grad:
            (grad,) = ctx.saved_tensors
            # Each row's gradient times its d loss / d L_i, in place: the buffer is this function's own.
            return grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype)), *(None,) * 9
        student, valid, *per_row = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for rows in _chunks(valid, student.shape[-1]):
            x = student[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                terms = token_terms(x, **_rows(rows, *per_row), stats=False, **ctx.options)
                (grad[rows],) = torch.autograd.grad(terms.loss, x, grad_loss[rows].to(terms.loss.dtype))
        return grad, *(None,) * 9


def chunked_terms(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence, beta,
                  temperature, stats=True) -> TokenTerms:
    loss, out_stats = ChunkedTokenDivergence.apply(student, teacher, valid, tokens, teacher_logprobs,
                                                   rollout_logprobs, divergence, beta, temperature, stats)
    return TokenTerms(loss, *out_stats.unbind(0))


def reference_terms(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, divergence, beta,
                    temperature, stats=True) -> TokenTerms:
    """The specification as a backend: token_terms on the valid rows, all at once, plain autograd."""
    b, t = valid.nonzero(as_tuple=True)
    terms = token_terms(student[b, t], **_rows((b, t), teacher, tokens, teacher_logprobs, rollout_logprobs),
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
