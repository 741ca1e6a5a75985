"""Public API: ``weighted_kl_loss`` and ``WeightedKLLoss``.

The flow: validate the inputs (wpkl/validation.py) -> pick a backend (wpkl/backends.py) -> compute the
per-token terms with one fused pass over the vocabulary (wpkl/vocab_pass.py launching kernels/, or the torch
paths) -> weight the tokens (wpkl/weighting.py) -> reduce (wpkl/reduction.py). Only the first two steps
after validation touch [N, V] data; weighting and reduction work on [B, T] per-token vectors.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .backends import compute_terms, resolve_backend
from .torch_path import chunked_teacher_token_logprobs
from .layout import SequenceLayout
from .reduction import reduce_loss
from .stats import TokenStats
from .reference import TokenTerms
from .validation import (
    Problem,
    check_inplace_backward,
    check_linear_options,
    check_options,
    check_values,
    validate,
    validate_linear,
)
from .weighting import PositionTable, Weighting, _device_table, compute_weights, sequence_positions


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
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk_mode: str = "tail",
    topk_logprob_floor: float | None = None,
    topk_loss_max: float | None = None,
    process_group=None,
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
            compute it from ``teacher_logits`` and ``tokens`` (a second read of the teacher's valid rows).
        teacher_topk_ids, teacher_topk_logprobs: a teacher given as its top-k tokens per position (a teacher
            server's answer), instead of ``teacher_logits`` (pass None there): int ids [..., K] (global vocabulary
            ids, -1 pads a shorter list) and the teacher's full-vocabulary log-probabilities of them [..., K]
            (-inf allowed; used as given, no temperature). Divergences: forward_kl, reverse_kl, jsd.
        topk_mode: "tail" (the K atoms plus one tail atom holding the rest of each distribution's mass: TRL's
            convention), "renormalize" (both restricted to the K atoms and renormalized) or "raw" (the atoms as
            given: verl's top-k forward KL). See wpkl/reference.py: topk_atom_terms.
        topk_logprob_floor, topk_loss_max: "raw" only: clamp both sides' top-k log-probabilities from below, and
            each token's loss from above (verl's log_prob_min_clamp and loss_max_clamp).
        inplace_backward: (Triton backend) write the gradient into the student logits' storage instead of a
            new [N, V] buffer. Only when nothing else reads those logits after this loss. The torch backends
            cannot: with ``backend="torch"`` or ``"reference"`` it is an error; when ``backend="auto"`` picks the
            torch path (CPU tensors) it is ignored, so one configuration runs everywhere.
        process_group: a ``torch.distributed.ProcessGroup`` over which the vocabulary is split (Megatron's
            tensor-parallel lm_head), or None (one device). Rank r passes its slice
            ``[r * V_local, (r + 1) * V_local)`` of the student and the teacher logits (equal slices; ``tokens`` and
            ``teacher_topk_ids`` stay global ids; everything else is the same on every rank). Every rank returns
            the same loss and stats; the gradient is the rank's slice of the full-vocabulary gradient. The Triton
            backend runs its kernels on each slice and merges their per-token statistics (two all-reduces of
            [k, N] per call, none in backward); jsd (0 < beta < 1) and top-k teachers run the torch path; weights
            and reduction run in torch; ``inplace_backward`` is ignored. Collectives and bytes: docs/design.md.
            Inputs are checked on every rank, then one all-gather of their shapes makes every rank raise (or
            none) before any other collective. Every rank of the group must make the call (and its backward).

    Returns:
        The loss (float32, or float64 for float64 input): a scalar, or the leading shape for "none"; with
        ``return_stats=True`` a ``(loss, TokenStats)`` pair.
    """
    def prepare():
        return _prepared(validate(
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
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            topk_mode=topk_mode,
            topk_logprob_floor=topk_logprob_floor,
            topk_loss_max=topk_loss_max,
        ), return_stats, backend, inplace_backward, process_group)

    if process_group is None:
        problem, resolved = prepare()
        if resolved == "triton" and problem.topk_ids is None:
            return _triton_weighted_loss(problem, return_stats, inplace_backward)
        # The torch paths, and a top-k teacher on the Triton path: its vocabulary pass on the kernels (one read of
        # the student rows forward, one read and write backward), its weights and reduction in torch.
        check_values(problem)
    else:
        problem, resolved = _agreed(process_group, prepare, return_stats)
    seq = _Sequences(problem, _teacher_token_logprobs(problem))
    terms = compute_terms(problem, resolved, stats=_needs_stats(problem, return_stats),
                          inplace_backward=inplace_backward and resolved == "triton" and process_group is None)
    return _weigh_and_reduce(problem, terms, return_stats, seq)


def _prepared(problem: Problem, return_stats, backend: str, inplace_backward, process_group=None,
              weights_kernel: bool = True):
    """The checks after ``validate`` and the backend that runs: (problem, resolved backend). ``weights_kernel``:
    the Triton backend would weigh in a kernel (materialized logits; the fused-linear form weighs in torch)."""
    _check_return_stats(return_stats)
    resolved = resolve_backend(backend, problem)
    check_inplace_backward(inplace_backward, backend, resolved)
    if process_group is not None:
        # Vocabulary-parallel: weights in torch on every path; jsd's second pass needs the global normalizers
        # inside the kernel, and a top-k teacher's atoms are spread over the ranks, so both run the torch pass
        # (wpkl/tensor_parallel.py).
        if resolved == "triton" and (problem.topk_ids is not None or (
                problem.divergence == "jsd" and problem.beta not in (0.0, 1.0))):
            resolved = "torch"
        return problem, resolved
    # A top-k teacher on the Triton path weighs in torch (wpkl/vocab_pass.py ``_topk_forward``): every weighting.
    weights_kernel = weights_kernel and problem.topk_ids is None
    return problem, _torch_weights_only(problem, backend, resolved) if weights_kernel else resolved


def _agreed(process_group, prepare, return_stats: bool):
    """A vocabulary-parallel call's validation: local, then one all-gather so that every rank raises or none
    does (wpkl/tensor_parallel.py: ``agree``). Returns (problem with its ``shard``, resolved backend)."""
    from .tensor_parallel import agree

    def prepare_with_options():
        problem, resolved = prepare()
        # What decides the number and order of the collectives: every rank must agree on it.
        options = [problem.divergence, problem.beta, problem.temperature, problem.reduction, return_stats,
                   _needs_stats(problem, return_stats), repr(problem.weighting), problem.topk_mode,
                   *(x is None for x in (problem.tokens, problem.teacher_logprobs, problem.rollout_logprobs,
                                         problem.teacher_token_logprobs, problem.user_weights, problem.positions)),
                   # the fused-linear form's chunks and schedule (eager or two-phase) set when its collectives run
                   None if problem.linear is None else problem.linear.chunk_size,
                   torch.is_autocast_enabled(problem.device.type)]
        return problem, resolved, options

    return agree(process_group, prepare_with_options, check_values)


def _check_group_type(process_group) -> None:
    if process_group is not None:
        from .tensor_parallel import check_group_type

        check_group_type(process_group)


def _torch_weights_only(problem: Problem, backend: str, resolved: str) -> str:
    """``prefix_confidence`` (a windowed order statistic of the teacher's NLL) exists in the torch weights
    (wpkl/weighting.py) only, not in the Triton weights kernel (kernels/token_weights.py): ``backend="auto"`` then
    runs the torch path, an explicit ``backend="triton"`` is refused."""
    weighting = problem.weighting
    if resolved != "triton" or weighting is None or weighting.prefix_confidence is None:
        return resolved
    if backend == "triton":
        raise ValueError('Weighting(prefix_confidence=...) is not in the Triton weights kernel: use backend="torch" '
                         '(backend="auto" picks it for this weighting)')
    return "torch"


def _teacher_token_logprobs(problem: Problem) -> torch.Tensor | None:
    """log q(y) of the sampled tokens when the weighting needs it: given, or computed from the teacher logits."""
    if problem.weighting is None or not problem.weighting.needs_teacher_token_logprobs:
        return None
    if problem.teacher_token_logprobs is not None:
        return problem.teacher_token_logprobs
    if problem.teacher_logprobs is not None:
        return problem.teacher_logprobs
    # validation guarantees teacher logits and tokens here
    return chunked_teacher_token_logprobs(problem.teacher, problem.valid, problem.tokens, problem.temperature,
                                          problem.vocab, problem.shard)


def _triton_weighted_loss(problem: Problem, return_stats: bool, inplace_backward: bool):
    """The Triton path: the vocabulary pass and the weights kernel make the loss, the weights and the value checks
    in two kernels (backward: one), with no host sync, as a torch custom op (wpkl/ops.py) that torch.compile
    traces without graph breaks."""
    from . import ops
    from .vocab_pass import encode_weighting

    count = problem.num_items_in_batch
    tensor_count = None
    if isinstance(count, torch.Tensor):
        tensor_count, count = count.to(problem.device, non_blocking=True).reshape(()), None
    weighting = problem.weighting
    table = None
    if weighting is not None and isinstance(weighting.position, PositionTable):
        table = _device_table(weighting.position.values, problem.device, torch.float32)
    segments = 0 if not problem.packed else (1 if problem.positions is not None else 2)
    loss, stats, weight, position, _ = ops.weighted_loss(
        problem.student, problem.teacher, problem.valid, problem.tokens, problem.teacher_logprobs,
        problem.rollout_logprobs, problem.user_weights, problem.positions, tensor_count, table, problem.divergence,
        problem.beta, problem.temperature, encode_weighting(weighting), problem.reduction, segments,
        math.nan if count is None else float(count), inplace_backward)
    if problem.reduction == "none":
        loss = loss.reshape(problem.leading_shape)
    if not return_stats:
        return loss
    def leading(x):  # the custom op's outputs all carry its autograd node: the stats must not hold the graph
        return x.detach().reshape(problem.leading_shape)

    stats = TokenStats(divergence=leading(stats[0]), weight=leading(weight), teacher_confidence=leading(stats[1]),
                       teacher_entropy=leading(stats[3]), student_entropy=leading(stats[2]),
                       position=leading(position), mask=leading(problem.valid))
    return loss, stats


def _check_return_stats(return_stats) -> None:
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")


def _needs_stats(problem: Problem, return_stats: bool) -> bool:
    """Whether the teacher confidence and the entropies are needed (the torch path skips them otherwise)."""
    return return_stats or (problem.weighting is not None and problem.weighting.confidence > 0)


class _Sequences:
    """The [B, T] per-token vectors laid out one sequence per row (wpkl/layout.py), with their positions."""

    def __init__(self, problem: Problem, teacher_token_logprobs: torch.Tensor | None = None):
        self.layout = SequenceLayout(problem.packed, problem.positions)
        self.valid = self.layout.rows(problem.valid)
        given = None if problem.positions is None else self.layout.rows(problem.positions)
        self.positions = sequence_positions(self.valid) if given is None else given
        self.user_weights = None if problem.user_weights is None else self.layout.rows(problem.user_weights)
        self.token_logprobs = None if teacher_token_logprobs is None else self.layout.rows(teacher_token_logprobs)

    def weights(self, weighting: Weighting | None, divergence: torch.Tensor, confidence: torch.Tensor):
        return compute_weights(weighting, valid=self.valid, divergence=self.layout.rows(divergence),
                               confidence=self.layout.rows(confidence), user_weights=self.user_weights,
                               positions=self.positions, teacher_token_logprobs=self.token_logprobs)


def _weigh_and_reduce(problem: Problem, terms: TokenTerms, return_stats: bool, seq: _Sequences | None = None):
    """Weights (wpkl/weighting.py) and reduction (wpkl/reduction.py) on the [B, T] per-token terms: shared by
    every input form (``seq``: the sequence layout, when the caller already built it)."""
    seq = _Sequences(problem) if seq is None else seq
    layout, valid = seq.layout, seq.valid
    weights = seq.weights(problem.weighting, terms.divergence, terms.confidence)
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
        position=per_token(layout.tokens(seq.positions)),
        mask=leading(problem.valid),
    )
    return loss, stats


class _EagerCoefficients:
    """The fused-linear form's eager schedule (wpkl/fused_linear.py): each token's d loss / d L_i up to one scalar
    for the whole batch, from the same weight and reduction code, as soon as the token's chunk is done.

    d loss / d L_i = w_i * r_i with r_i = d reduce(x) / d x_i (constant: the reduction is linear) and w_i the
    weight without normalization; normalization and the upstream gradient make the one remaining scalar.
    Token i's weight needs only its own divergence and confidence, the mask and positions, except for
    ``accumulated``, which needs the whole sequence: then chunks hold whole sequences (``whole_rows``).
    """

    def __init__(self, problem: Problem, seq: _Sequences):
        self.seq = seq
        self.shape = problem.valid.shape
        weighting = problem.weighting
        self.weighting = None if weighting is None else dataclasses.replace(weighting, normalize=False)
        self.whole_rows = weighting is not None and weighting.accumulated > 0
        x = torch.zeros(self.seq.valid.shape, dtype=torch.float64, device=problem.device, requires_grad=True)
        with torch.enable_grad():
            reduced = reduce_loss(x, self.seq.valid, problem.reduction, problem.num_items_in_batch)
            (self.reduction_coef,) = torch.autograd.grad(reduced, x)

    def __call__(self, ids: torch.Tensor, loss: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
        divergence, confidence = (x.reshape(self.shape) for x in stats[:2])
        weights = self.seq.weights(self.weighting, divergence, confidence)
        coef = self.seq.layout.tokens(weights.double() * self.reduction_coef)
        return coef.reshape(-1)[ids]


def fused_linear_kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
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
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    chunk_size: int | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk_mode: str = "tail",
    topk_logprob_floor: float | None = None,
    topk_loss_max: float | None = None,
    process_group=None,
):
    """``weighted_kl_loss`` from hidden states and lm_head weights, never materializing [N, V] logits.

    The result (loss, stats, and the gradients of ``student_hidden``, ``student_weight`` and ``student_bias``)
    equals ``weighted_kl_loss`` on the logits ``softcap(scale * (hidden @ weight.T + bias))``, with
    ``softcap(x) = c * tanh(x / c)`` (TRL's order: scale, then softcap), for every option of
    ``weighted_kl_loss``. Precision follows TRL's ``DistillationTrainer`` (its reference here): the weight is cast to
    the hidden states' dtype (the autocast dtype under autocast), products accumulate and are returned in
    float32, the bias is added in float32; the logits-gradient is cast to that dtype for the two gradient GEMMs,
    which accumulate in float32. So bf16 hidden states with an fp32 weight and bias work as in TRL.

    Args (beyond ``weighted_kl_loss``'s, which keep their meaning; the logits' leading shape is the hidden
    states'):
        student_hidden: [B, T, H] or [N, H] (requires grad).
        student_weight: the student's lm_head weight [V, H] (may require grad; an FSDP2 DTensor is gathered once).
        teacher_hidden: [B, T, H_t] or [N, H_t], no gradient; None with ``teacher_logprobs`` ("sampled").
        teacher_weight: [V_t >= V, H_t]; only the first V rows are used. None with ``teacher_hidden=None``.
        student_bias, teacher_bias: [V] / [V_t] or None.
        student_logit_scale, teacher_logit_scale: multiply the logits before the softcap.
        student_softcap, teacher_softcap: ``c`` of the softcap, or None.
        chunk_size: tokens per chunk; None picks it from a 2 GiB budget (wpkl/fused_linear.py states the formula).
        teacher_token_logprobs: log q(y) of the sampled tokens, as in ``weighted_kl_loss``; here it is never
            computed from the teacher (that would need another projection): weightings that need it take it given
            (or ``teacher_logprobs``).
        teacher_topk_ids, teacher_topk_logprobs, topk_mode, topk_logprob_floor, topk_loss_max: a teacher given as
            top-k atoms (with ``teacher_hidden=None`` and ``teacher_weight=None``), as in ``weighted_kl_loss``.
        process_group: as in ``weighted_kl_loss``: the lm_head weights (and biases) are the rank's rows
            ``[r * V_local, (r + 1) * V_local)`` of the student's and the teacher's (Megatron's column-parallel
            output layer; plain tensors, the local shard); the hidden states are the same on every rank. The
            weight and bias gradients are the rank's rows; the hidden states' gradient is the full one: wpkl
            all-reduces it over the group (the all-reduce Megatron's column-parallel layer makes in its backward),
            so do not pass hidden states through ``copy_to_tensor_model_parallel_region`` (or all-reduce their
            gradient) again.

    Memory and GEMMs: wpkl/fused_linear.py (module docstring) and docs/design.md. Valid tokens are compacted
    first, which costs one host sync.
    """
    from .projection import gather_full, projection_dtype

    if process_group is None:  # with one, the weights are this rank's shard as given
        student_weight, student_bias = gather_full(student_weight), gather_full(student_bias)
        teacher_weight, teacher_bias = gather_full(teacher_weight), gather_full(teacher_bias)
    linear_args = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    linear_kwargs = dict(
        student_bias=student_bias, teacher_bias=teacher_bias, student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_softcap=student_softcap, teacher_softcap=teacher_softcap, chunk_size=chunk_size, mask=mask,
        weighting=weighting, token_weights=token_weights, positions=positions, tokens=tokens, divergence=divergence,
        beta=beta, temperature=temperature, reduction=reduction, num_items_in_batch=num_items_in_batch,
        teacher_logprobs=teacher_logprobs, rollout_logprobs=rollout_logprobs, backend=backend,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs, topk_mode=topk_mode,
        topk_logprob_floor=topk_logprob_floor, topk_loss_max=topk_loss_max,
        teacher_token_logprobs=teacher_token_logprobs,
    )
    if process_group is None:
        problem, resolved = _prepared(validate_linear(*linear_args, **linear_kwargs), return_stats, backend, False,
                                      weights_kernel=False)
        check_values(problem)
    else:
        problem, resolved = _agreed(process_group, lambda: _prepared(
            validate_linear(*linear_args, **linear_kwargs), return_stats, backend, False, process_group,
            weights_kernel=False), return_stats)
    lin = problem.linear
    trainable = any(x is not None and x.requires_grad for x in (lin.student_hidden, lin.student_weight,
                                                                lin.student_bias))
    # The eager schedule (wpkl/fused_linear.py) needs a scalar upstream and a compute dtype whose range holds the
    # unscaled logits-gradient: float16 (GradScaler's loss scale) runs two-phase.
    eager = (problem.reduction != "none" and trainable and torch.is_grad_enabled() and resolved != "reference"
             and projection_dtype(lin.student_hidden) != torch.float16)
    seq = _Sequences(problem, _teacher_token_logprobs(problem))
    terms = compute_terms(problem, resolved, stats=_needs_stats(problem, return_stats),
                          coefficients=_EagerCoefficients(problem, seq) if eager else None)
    return _weigh_and_reduce(problem, terms, return_stats, seq)


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
        process_group=None,
    ):
        super().__init__()
        self.process_group = process_group  # vocabulary-parallel (see weighted_kl_loss); None: one device
        _check_group_type(process_group)
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
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, weighting={self.weighting}")


class FusedLinearWeightedKLLoss(nn.Module):
    """``fused_linear_kl_loss`` with its configuration held by a module (the same split as ``WeightedKLLoss``)."""

    def __init__(
        self,
        weighting: Weighting | None = None,
        divergence: str = "reverse_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        reduction: str = "mean",
        backend: str = "auto",
        *,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
        student_softcap: float | None = None,
        teacher_softcap: float | None = None,
        chunk_size: int | None = None,
        process_group=None,
    ):
        super().__init__()
        self.process_group = process_group  # vocabulary-parallel (see fused_linear_kl_loss); None: one device
        _check_group_type(process_group)
        self.weighting = weighting
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.reduction = reduction
        self.backend = backend
        self.student_logit_scale = student_logit_scale
        self.teacher_logit_scale = teacher_logit_scale
        self.student_softcap = student_softcap
        self.teacher_softcap = teacher_softcap
        self.chunk_size = chunk_size
        # Fail at construction, not at the first training step.
        check_options(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                      weighting=weighting, backend=backend)
        check_linear_options(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                             student_softcap=student_softcap, teacher_softcap=teacher_softcap, chunk_size=chunk_size)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, token_weights=None,
                positions=None, tokens=None, return_stats=False, *, student_bias=None, teacher_bias=None,
                num_items_in_batch=None, teacher_logprobs=None, rollout_logprobs=None, teacher_token_logprobs=None):
        return fused_linear_kl_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask, weighting=self.weighting,
            token_weights=token_weights, positions=positions, tokens=tokens, divergence=self.divergence,
            beta=self.beta, temperature=self.temperature, reduction=self.reduction, return_stats=return_stats,
            backend=self.backend, student_bias=student_bias, teacher_bias=teacher_bias,
            student_logit_scale=self.student_logit_scale, teacher_logit_scale=self.teacher_logit_scale,
            student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap,
            num_items_in_batch=num_items_in_batch, teacher_logprobs=teacher_logprobs,
            rollout_logprobs=rollout_logprobs, teacher_token_logprobs=teacher_token_logprobs,
            chunk_size=self.chunk_size, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (f"divergence={self.divergence!r}, beta={self.beta}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, weighting={self.weighting}, chunk_size={self.chunk_size}")
