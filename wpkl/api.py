"""Public API: ``weighted_kl_loss`` and ``WeightedKLLoss``.

The flow: validate the inputs (wpkl/validation.py) -> pick a backend (wpkl/backends.py) -> compute the
per-token terms with one fused pass over the vocabulary (wpkl/autograd.py launching kernels/, or the torch
paths) -> weight the tokens (wpkl/weighting.py) -> reduce (wpkl/reduction.py). Only the first two steps
after validation touch [N, V] data; weighting and reduction work on [B, T] per-token vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from .backends import compute_terms, resolve_backend
from .torch_path import chunked_teacher_token_logprobs
from .layout import SequenceLayout
from .reduction import reduce_loss
from .stats import TokenStats
from .validation import check_inplace_backward, check_options, validate
from .weighting import Weighting, compute_weights, sequence_positions


def weighted_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    weighting: Weighting | None = None,
    token_weights: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    tokens: torch.Tensor | None = None,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    return_stats: bool = False,
    backend: str = "auto",
    *,
    num_items_in_batch: torch.Tensor | float | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    inplace_backward: bool = False,
):
    """Weighted token-level divergence between student and teacher next-token distributions.

    Args:
        student_logits: [B, T, V] or [N, V]; float32, bfloat16, float16 (or float64 off the Triton backend).
        teacher_logits: the same leading shape with V_t >= V; only the first V columns are used. No gradient.
        mask: bool, leading shape; False marks a token to ignore (prompt, padding).
        weighting: a ``wpkl.Weighting``; None is uniform weighting (standard OPD), without normalization.
        token_weights: float >= 0, leading shape: an extra per-token multiplier.
        positions: int >= 0, leading shape; overrides the positions counted from the mask. On [N, V] input a
            position of 0 starts a new sequence (packed batches).
        tokens: int, leading shape: the sampled token at each position (needed by ``divergence="sampled"``).
        divergence: "reverse_kl", "forward_kl", "jsd" or "sampled" (see ``wpkl.reference``).
        beta: the jsd mixture coefficient in [0, 1]; 0 is forward KL and 1 is reverse KL.
        temperature: divides both sets of logits before the softmax.
        reduction: "mean" (over valid tokens), "sum", "seq_mean" (mean of per-sequence means) or "none".
        return_stats: also return a ``wpkl.TokenStats``.
        backend: "auto", "triton", "torch" or "reference" (see ``wpkl.backends``).
        num_items_in_batch: for "mean", divide by this count (e.g. the valid tokens of all micro-batches and
            ranks, for gradient accumulation) instead of the local valid-token count.
        teacher_logprobs: "sampled" only, leading shape: log q(y) of the sampled tokens, given instead of
            ``teacher_logits`` (pass None for those), e.g. from a teacher server. No confidence weighting then.
        rollout_logprobs: "sampled" only, leading shape: log p(y) under the policy that sampled y (e.g. vLLM's),
            used in the advantage a = log q(y) - log p(y) as TRL's IW-OPD does.
        teacher_token_logprobs: leading shape: log q(y) of the sampled tokens, for weightings that need it
            (``Weighting(prefix_confidence=...)``). Without it they use ``teacher_logprobs`` ("sampled"), or
            compute it from ``teacher_logits`` and ``tokens`` on the torch and reference backends (the Triton
            kernels do not report it).
        inplace_backward: (Triton backend) write the gradient into the student logits' storage instead of a
            new [N, V] buffer. Only when nothing else reads those logits after this loss. The torch backends
            cannot: with ``backend="torch"`` or ``"reference"`` it is an error; when ``backend="auto"`` picks the
            torch path (CPU tensors) it is ignored, so one configuration runs everywhere.

    Returns:
        The loss (float32, or float64 for float64 input): a scalar, or the leading shape for "none"; with
        ``return_stats=True`` a ``(loss, TokenStats)`` pair.
    """
    problem = validate(
        student_logits,
        teacher_logits,
        mask=mask,
        weighting=weighting,
        token_weights=token_weights,
        positions=positions,
        tokens=tokens,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        teacher_logprobs=teacher_logprobs,
        rollout_logprobs=rollout_logprobs,
        teacher_token_logprobs=teacher_token_logprobs,
        backend=backend,
    )
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    resolved = resolve_backend(backend, problem)
    check_inplace_backward(inplace_backward, backend, resolved)
    token_logprobs = _teacher_token_logprobs(problem, resolved)
    needs_stats = return_stats or (problem.weighting is not None and problem.weighting.confidence > 0)
    terms = compute_terms(problem, resolved, inplace_backward=inplace_backward and resolved == "triton",
                          stats=needs_stats)

    layout = SequenceLayout(problem.packed, problem.positions)
    valid = layout.rows(problem.valid)
    given = None if problem.positions is None else layout.rows(problem.positions)
    pos = sequence_positions(valid) if given is None else given
    weights = compute_weights(
        problem.weighting,
        valid=valid,
        divergence=layout.rows(terms.divergence),
        confidence=layout.rows(terms.confidence),
        user_weights=None if problem.user_weights is None else layout.rows(problem.user_weights),
        positions=pos,
        teacher_token_logprobs=None if token_logprobs is None else layout.rows(token_logprobs),
    )
    weighted = torch.where(valid, weights * layout.rows(terms.loss), 0.0)
    if problem.reduction == "none":
        loss = layout.tokens(weighted).reshape(problem.leading_shape)
    else:
        loss = reduce_loss(weighted, valid, problem.reduction, problem.num_items_in_batch)
    if not return_stats:
        return loss

    def leading(x: torch.Tensor) -> torch.Tensor:
        return x.detach().reshape(problem.leading_shape)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return leading(torch.where(problem.valid, x, 0.0).float())

    stats = TokenStats(
        divergence=per_token(terms.divergence),
        weight=per_token(layout.tokens(weights)),
        teacher_confidence=per_token(terms.confidence),
        teacher_entropy=per_token(terms.teacher_entropy),
        student_entropy=per_token(terms.student_entropy),
        position=per_token(layout.tokens(pos)),
        mask=leading(problem.valid),
    )
    return loss, stats


def _teacher_token_logprobs(problem, backend: str) -> torch.Tensor | None:
    """log q(y) of the sampled tokens when the weighting needs it: given, or computed on the torch backends."""
    if problem.weighting is None or not problem.weighting.needs_teacher_token_logprobs:
        return None
    if problem.teacher_token_logprobs is not None:
        return problem.teacher_token_logprobs
    if problem.teacher_logprobs is not None:
        return problem.teacher_logprobs
    if backend == "triton":
        raise ValueError("Weighting(prefix_confidence=...) on the Triton backend needs teacher_token_logprobs "
                         "(log q(y) of the sampled tokens): the kernels do not report it")
    return chunked_teacher_token_logprobs(problem.teacher, problem.valid, problem.tokens, problem.temperature,
                                          problem.student.shape[-1])


class WeightedKLLoss(nn.Module):
    """``weighted_kl_loss`` with its configuration held by a module, for trainers that expect one."""

    def __init__(
        self,
        weighting: Weighting | None = None,
        divergence: str = "reverse_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        inplace_backward: bool = False,
    ):
        super().__init__()
        self.weighting = weighting
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.inplace_backward = inplace_backward
        # Fail at construction, not at the first training step.
        check_options(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                      weighting=weighting, backend=backend)
        check_inplace_backward(inplace_backward, backend, None)

    def forward(self, student_logits, teacher_logits, mask=None, token_weights=None, positions=None, tokens=None,
                return_stats=False, num_items_in_batch=None, teacher_token_logprobs=None):
        return weighted_kl_loss(
            student_logits,
            teacher_logits,
            mask=mask,
            weighting=self.weighting,
            token_weights=token_weights,
            positions=positions,
            tokens=tokens,
            divergence=self.divergence,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            return_stats=return_stats,
            backend=self.backend,
            num_items_in_batch=num_items_in_batch,
            teacher_token_logprobs=teacher_token_logprobs,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, weighting={self.weighting}")
