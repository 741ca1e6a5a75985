"""The torch backends: "torch", the reference math over chunks of rows, and "reference", the same math on all
valid rows at once under plain autograd.

The chunked path works on any device torch supports. It never holds more than a few [chunk, V] buffers in the
compute dtype (float32, or float64 for float64 input) besides the [B, T, V] gradient (the chunking and the
per-chunk math: ``TorchPass`` in wpkl/vocab_pass.py):

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

from .reference import TokenTerms, TopK, compute_dtype, teacher_token_logprob, token_terms
from .vocab_pass import PassSpec, TorchPass, _rows, row_chunks


class ChunkedTokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, topk_ids, topk_logprobs, valid, tokens, teacher_logprobs, rollout_logprobs,
                spec: PassSpec, passes=TorchPass, inplace_backward=False):
        teacher_given = TopK(topk_ids, topk_logprobs) if topk_ids is not None else teacher
        if passes is not TorchPass:  # the kernels (a top-k teacher's Triton path): backward reads the saved stats
            loss, out_stats, saved = passes.forward(student, teacher_given, valid, tokens, teacher_logprobs,
                                                    rollout_logprobs, spec)
            ctx.eager_grad, ctx.saved_pass, ctx.passes, ctx.inplace = False, saved, passes, inplace_backward
            ctx.mark_non_differentiable(out_stats)
            return loss, out_stats
        dtype = compute_dtype(*(x for x in (student, teacher) if x is not None))
        # The gradient now when it needs no memory the returned gradient does not (see the module docstring).
        eager_grad = ctx.needs_input_grad[0] and student.dtype == dtype
        row_grad = torch.zeros_like(student) if eager_grad else None
        ctx.passes = TorchPass
        loss, out_stats, saved = TorchPass.forward(student, teacher_given, valid, tokens, teacher_logprobs,
                                                   rollout_logprobs, spec, row_grad=row_grad)
        ctx.eager_grad, ctx.saved_pass = eager_grad, saved
        tensors = (student, teacher, topk_ids, topk_logprobs, valid, tokens, teacher_logprobs, rollout_logprobs)
        ctx.save_for_backward(*((row_grad,) if eager_grad else tensors))
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        nones = (None,) * 10
        if ctx.passes is not TorchPass:
            saved = ctx.saved_pass
            out = saved.student if ctx.inplace else torch.empty_like(saved.student)
            return ctx.passes.backward(saved, grad_loss, out), *nones
        if ctx.eager_grad:
            (grad,) = ctx.saved_tensors
            # Each row's gradient times its d loss / d L_i, in place: the buffer is this function's own.
            return grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype)), *nones
        student, teacher, topk_ids, topk_logprobs, valid, *per_token = ctx.saved_tensors
        saved = ctx.saved_pass
        teacher_given = TopK(topk_ids, topk_logprobs) if topk_ids is not None else teacher
        saved.student, saved.valid, saved.per_row = student, valid, (teacher_given, *per_token)
        return TorchPass.backward(saved, grad_loss, torch.empty_like(student)), *nones


def chunked_terms(student, teacher, topk_ids, topk_logprobs, valid, tokens, teacher_logprobs, rollout_logprobs,
                  spec: PassSpec, passes=TorchPass, inplace_backward=False) -> TokenTerms:
    """Per-token terms through ``ChunkedTokenDivergence``: the torch pass, or ``passes=TritonPass`` (a top-k
    teacher on the kernels, whose weights and reduction then run in torch)."""
    loss, out_stats = ChunkedTokenDivergence.apply(student, teacher, topk_ids, topk_logprobs, valid, tokens,
                                                   teacher_logprobs, rollout_logprobs, spec, passes,
                                                   inplace_backward)
    return TokenTerms(loss, *out_stats.unbind(0))


def reference_terms(student, teacher, topk_ids, topk_logprobs, valid, tokens, teacher_logprobs, rollout_logprobs,
                    spec: PassSpec) -> TokenTerms:
    """The specification as a backend: token_terms on the valid rows, all at once, plain autograd."""
    b, t = valid.nonzero(as_tuple=True)
    teacher_given = TopK(topk_ids, topk_logprobs) if topk_ids is not None else teacher
    terms = token_terms(student[b, t], **_rows((b, t), teacher_given, tokens, teacher_logprobs, rollout_logprobs),
                        divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature, topk=spec.topk,
                        shard=spec.shard)
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
