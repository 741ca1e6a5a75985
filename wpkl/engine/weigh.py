"""Weights and reduction in torch, on the [B, T] per-token terms: every route but the fused op (whose weights
kernel does the same from the same reference math, wpkl/reference/weights.py and reduction.py).

``Sequences`` lays the per-token vectors out one sequence per row (wpkl/inputs/layout.py); ``weigh_and_reduce``
gives the loss and, with ``return_stats``, the ``TokenStats`` (built in one place, detached: ``token_stats``);
``EagerCoefficients`` gives the fused-linear form's eager schedule its per-token coefficients.
"""

from __future__ import annotations

import dataclasses

import torch

from ..backends.torch_pass import chunked_teacher_token_logprobs
from ..inputs.checks import run_checks
from ..inputs.data import Problem
from ..inputs.layout import SequenceLayout
from ..parallel.sequence import GatheredSequences
from ..reference import TokenTerms, compute_weights, mix_teachers, reduce_loss, sequence_positions
from ..stats import TokenStats
from ..weighting import Weighting


def teacher_token_logprobs(problem: Problem) -> torch.Tensor | None:
    """log q(y) of the sampled tokens when the weighting needs it: given, or computed from the teacher logits."""
    weighting, batch = problem.spec.weighting, problem.batch
    if weighting is None or not weighting.needs_teacher_token_logprobs:
        return None
    if batch.teacher_token_logprobs is not None:
        return batch.teacher_token_logprobs
    if problem.teacher_logprobs is not None:
        return problem.teacher_logprobs
    # the input checks guarantee teacher logits and tokens here
    return chunked_teacher_token_logprobs(problem.teacher_logits, batch.valid, batch.tokens,
                                          problem.spec.temperature, problem.vocab, problem.shard)


class Sequences:
    """The [B, T] per-token vectors laid out one sequence per row, with their positions."""

    def __init__(self, problem: Problem):
        batch = problem.batch
        if batch.sequence_ids is not None:
            self.layout = SequenceLayout.by_ids(batch.sequence_ids, batch.positions)
            run_checks(self.layout.checks)
        else:
            self.layout = SequenceLayout(batch.packed, batch.positions)
        self.valid = self.layout.rows(batch.valid)
        # with sequence_ids the positions place the tokens; the weights count the valid ones (wpkl/inputs/layout.py)
        given = None if batch.positions is None or batch.sequence_ids is not None else self.layout.rows(batch.positions)
        self.positions = sequence_positions(self.valid) if given is None else given
        self.user_weights = None if batch.token_weights is None else self.layout.rows(batch.token_weights)
        token_logprobs = teacher_token_logprobs(problem)
        self.token_logprobs = None if token_logprobs is None else self.layout.rows(token_logprobs)

    def weights(self, weighting: Weighting | None, divergence: torch.Tensor, confidence: torch.Tensor,
                student_entropy: torch.Tensor | None = None):
        return compute_weights(weighting, valid=self.valid, divergence=self.layout.rows(divergence),
                               confidence=self.layout.rows(confidence), user_weights=self.user_weights,
                               positions=self.positions, teacher_token_logprobs=self.token_logprobs,
                               student_entropy=None if student_entropy is None else self.layout.rows(student_entropy))


def token_stats(problem: Problem, divergence, weight, confidence, teacher_entropy, student_entropy, position, *,
                zeroed: bool = False) -> TokenStats:
    """The one builder of ``TokenStats``: float32, the caller's leading shape, 0 on masked tokens, detached (the
    stats never hold the autograd graph). ``zeroed``: the inputs are float32 and 0 on masked tokens already (the
    weights kernel's outputs)."""
    valid = problem.batch.valid

    def leading(x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(problem.batch.leading_shape)

    def per_token(x: torch.Tensor) -> torch.Tensor:  # (a layout's [1, N] tokens are the [B, T] ones flattened)
        return leading(x) if zeroed else leading(torch.where(valid, x.detach().reshape(valid.shape), 0.0).float())

    return TokenStats(divergence=per_token(divergence), weight=per_token(weight),
                      teacher_confidence=per_token(confidence), teacher_entropy=per_token(teacher_entropy),
                      student_entropy=per_token(student_entropy), position=per_token(position), mask=leading(valid))


def mix_terms(terms: list[TokenTerms], mixing: list, valids: list[torch.Tensor]) -> TokenTerms:
    """Several teachers' per-token terms as one (wpkl/reference: ``mix_teachers``): the loss, the divergence, the
    teacher's confidence and entropy mixed by the weights (numbers, or tensors broadcastable to the tokens'
    leading shape), each teacher's terms taken where its own mask holds the token; the student's entropy is the
    same under every teacher that saw the token."""
    def rows(m, like):
        return m.expand(valids[0].shape).reshape(like.shape) if isinstance(m, torch.Tensor) else m

    def mixed(field):
        values = [torch.where(v.reshape(t.loss.shape), getattr(t, field), 0.0) for t, v in zip(terms, valids,
                                                                                              strict=True)]
        return mix_teachers(values, [rows(m, t.loss) for m, t in zip(mixing, terms, strict=True)])

    entropy = torch.stack([torch.where(v.reshape(t.loss.shape), t.student_entropy, float("-inf"))
                           for t, v in zip(terms, valids, strict=True)]).amax(0)
    return TokenTerms(mixed("loss"), mixed("divergence").detach(), mixed("confidence").detach(),
                      torch.where(torch.isfinite(entropy), entropy, 0.0).detach(),
                      mixed("teacher_entropy").detach())


def sequences(problem: Problem) -> Sequences | GatheredSequences:
    """The batch's sequences: this rank's, or with a ``sequence_group`` the whole batch's seen from this rank."""
    if problem.sequences is None:
        return Sequences(problem)
    return GatheredSequences(problem, teacher_token_logprobs(problem))


def weigh_and_reduce(problem: Problem, terms: TokenTerms, seq: Sequences | GatheredSequences):
    """The loss (and, with ``return_stats``, the stats) from the per-token terms."""
    spec, batch = problem.spec, problem.batch
    if isinstance(seq, GatheredSequences):
        weights, coefficients, positions = seq.local(terms.divergence, terms.confidence, terms.student_entropy)
        if spec.reduction == "none":
            loss = torch.where(batch.valid, weights * terms.loss, 0.0).reshape(batch.leading_shape)
        else:
            loss = torch.where(batch.valid, coefficients * terms.loss, 0.0).sum()
        if not spec.return_stats:
            return loss
        return loss, token_stats(problem, terms.divergence, weights, terms.confidence, terms.teacher_entropy,
                                 terms.student_entropy, positions)
    layout, valid = seq.layout, seq.valid
    weights = seq.weights(spec.weighting, terms.divergence, terms.confidence, terms.student_entropy)
    weighted = torch.where(valid, weights * layout.rows(terms.loss), 0.0)
    if spec.reduction == "none":
        loss = layout.tokens(weighted).reshape(batch.leading_shape)
    else:
        loss = reduce_loss(weighted, valid, spec.reduction, batch.num_items_in_batch)
    if not spec.return_stats:
        return loss
    return loss, token_stats(problem, terms.divergence, layout.tokens(weights), terms.confidence,
                             terms.teacher_entropy, terms.student_entropy, layout.tokens(seq.positions))


class EagerCoefficients:
    """The fused-linear form's eager schedule (wpkl/engine/linear.py): each token's d loss / d L_i up to one scalar
    for the whole batch, from the same weight and reduction code, as soon as the token's chunk is done.

    d loss / d L_i = w_i * r_i with r_i = d reduce(x) / d x_i (constant: the reduction is linear) and w_i the
    weight without normalization; normalization and the upstream gradient make the one remaining scalar.
    Token i's weight needs only its own divergence and confidence, the mask and positions, except for
    ``accumulated``, which needs the whole sequence: then chunks hold whole sequences (``whole_rows``).
    """

    def __init__(self, problem: Problem, seq: Sequences):
        self.seq = seq
        self.shape = problem.batch.valid.shape
        weighting = problem.spec.weighting
        self.weighting = None if weighting is None else dataclasses.replace(weighting, normalize=False)
        self.whole_rows = weighting is not None and weighting.accumulated > 0
        x = torch.zeros(self.seq.valid.shape, dtype=torch.float64, device=problem.device, requires_grad=True)
        with torch.enable_grad():
            reduced = reduce_loss(x, self.seq.valid, problem.spec.reduction, problem.batch.num_items_in_batch)
            (self.reduction_coef,) = torch.autograd.grad(reduced, x)

    def __call__(self, ids: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        divergence, confidence, entropy = (x.reshape(self.shape) for x in stats[:3])
        weights = self.seq.weights(self.weighting, divergence, confidence, entropy)
        coef = self.seq.layout.tokens(weights.double() * self.reduction_coef)
        return coef.reshape(-1)[ids]
