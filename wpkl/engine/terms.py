"""The per-token terms ([B, T] each: the loss differentiable, the statistics not) through one autograd Function.

``TokenDivergence.apply(adapter, *tensors)`` is the engine's only autograd entry point for the vocabulary passes
(the fused op of the custom-op route is torch's own, wpkl/backends/ops.py). An adapter turns one input form into
the pass's contract:

    forward(tensors, needs_grad) -> (loss [B, T], stats [4, B, T], state, to_save)
    backward(state, saved_tensors, grad_loss) -> one gradient (or None) per tensor

``to_save`` goes through ``ctx.save_for_backward`` (so saved-tensor hooks, e.g. activation offloading, see it);
``state`` holds the rest. ``LogitsAdapter`` (here) serves materialized logits on the torch pass, the Triton pass
with a top-k teacher and the vocabulary-sharded kernels (logits or top-k teachers); ``LinearAdapter`` (linear.py) the fused-linear form.
The reference backend needs no Function: plain autograd through the specification.
"""

from __future__ import annotations

import torch

from ..backends.torch_pass import TorchPass, TorchSaved, reference_terms
from ..backends.triton_pass import TritonPass
from ..backends.triton_topk import TritonTopKPass
from ..inputs.data import Problem
from ..reference import TokenTerms, TopK, compute_dtype
from .route import Route


class TokenDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adapter, *tensors):
        loss, stats, state, to_save = adapter.forward(tensors, ctx.needs_input_grad[1:])
        ctx.adapter, ctx.state = adapter, state
        ctx.save_for_backward(*to_save)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        return (None, *ctx.adapter.backward(ctx.state, ctx.saved_tensors, grad_loss))


def pass_for(route: Route, topk: bool):
    """The vocabulary pass a route runs (one with ``forward``/``backward`` of wpkl/backends/triton_pass.py)."""
    if route.terms == "sharded kernels":
        from ..parallel.merge import ShardedTritonPass
        from ..parallel.shard_topk import ShardedTritonTopKPass

        return ShardedTritonTopKPass if topk else ShardedTritonPass
    if route.backend == "triton":
        return TritonTopKPass if topk else TritonPass
    return TorchPass


class LogitsAdapter:
    """Materialized logits. tensors: (student, teacher logits, top-k ids, top-k log q, valid, tokens,
    teacher_logprobs, rollout_logprobs), None where absent.

    The torch pass with float32/float64 logits (the compute dtype) computes each chunk's d L_i / d logits during
    forward, right after its values, into the buffer backward returns: backward only scales each row by
    d loss / d L_i, in place, and the [chunk, V] math runs once instead of twice. With bfloat16/float16 logits an
    unscaled gradient stored in half precision would round twice (and in float32 would double its memory), so
    backward recomputes each chunk instead. The Triton passes save their per-token statistics and read the logits
    once more in backward."""

    def __init__(self, problem: Problem, route: Route):
        self.spec, self.shard, self.route = problem.spec, problem.shard, route
        self.passes = pass_for(route, problem.teacher_topk is not None)

    @staticmethod
    def teacher(teacher, ids, logprobs):
        return TopK(ids, logprobs) if ids is not None else teacher

    def forward(self, tensors, needs_grad):
        student, teacher, ids, logprobs, valid, tokens, teacher_logprobs, rollout_logprobs = tensors
        source = self.teacher(teacher, ids, logprobs)
        per_token = (valid, tokens, teacher_logprobs, rollout_logprobs)
        if self.passes is not TorchPass:
            loss, stats, saved = self.passes.forward(student, source, *per_token, self.spec, self.shard)
            return loss, stats.clone() if self.route.terms == "sharded kernels" else stats, ("pass", saved), ()
        dtype = compute_dtype(*(x for x in (student, teacher) if x is not None))
        eager = needs_grad[0] and student.dtype == dtype
        row_grad = torch.zeros_like(student) if eager else None
        loss, stats, saved = TorchPass.forward(student, source, *per_token, self.spec, self.shard, row_grad=row_grad)
        if eager:
            return loss, stats, ("eager", None), (row_grad,)
        return loss, stats, ("recompute", saved), tensors

    def backward(self, state, saved_tensors, grad_loss):
        kind, saved = state
        nones = (None,) * 7
        if kind == "pass":
            out = saved.student if self.route.inplace else torch.empty_like(saved.student)
            return self.passes.backward(saved, grad_loss, out), *nones
        if kind == "eager":
            (grad,) = saved_tensors
            # Each row's gradient times its d loss / d L_i, in place: the buffer is this Function's own (a row at
            # weight 0 is 0, whatever its gradient: a teacher's non-finite row there stays out).
            coef = grad_loss.unsqueeze(-1).to(grad.dtype)
            return grad.mul_(coef).masked_fill_(coef == 0, 0.0), *nones
        student, teacher, ids, logprobs, valid, tokens, teacher_logprobs, rollout_logprobs = saved_tensors
        saved = TorchSaved(student, self.teacher(teacher, ids, logprobs), valid, tokens, teacher_logprobs,
                           rollout_logprobs, self.spec, self.shard)
        return TorchPass.backward(saved, grad_loss, torch.empty_like(student)), *nones


def logits_terms(problem: Problem, route: Route) -> TokenTerms:
    """Materialized logits on every route but the fused op (wpkl/engine/fused.py)."""
    batch, topk = problem.batch, problem.teacher_topk
    student = problem.student.logits
    teacher = problem.teacher_logits
    if route.backend == "reference":
        source = topk if topk is not None else teacher
        return reference_terms(student, source, batch.valid, batch.tokens, problem.teacher_logprobs,
                               batch.rollout_logprobs, problem.spec, problem.shard)
    loss, stats = TokenDivergence.apply(
        LogitsAdapter(problem, route), student, teacher, None if topk is None else topk.ids,
        None if topk is None else topk.logprobs, batch.valid, batch.tokens, problem.teacher_logprobs,
        batch.rollout_logprobs)
    return TokenTerms(loss, *stats.unbind(0))
