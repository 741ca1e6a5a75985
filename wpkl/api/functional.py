"""The public functions: ``weighted_kl_loss`` (materialized logits) and ``fused_linear_kl_loss`` (hidden states
and lm_head weights). Each splits its arguments into the loss specification (``LossSpec``: the options, by the
names ``LossSpec.option_names`` gives) and the data, and hands both to the engine (wpkl/engine/run.py).
"""

from __future__ import annotations

import torch

from ..backends.projection import gather_full
from ..engine.run import linear_loss, materialized_loss
from ..spec import LossSpec
from ..weighting import Weighting


def split(arguments: dict, linear: bool) -> tuple[LossSpec, dict]:
    """A call's arguments (its ``locals()``) as (the spec of its options, the rest by name)."""
    names = LossSpec.option_names(linear)
    return (spec_or_agree(linear, {name: arguments[name] for name in names}, arguments.get("sequence_bounds")),
            {name: value for name, value in arguments.items() if name not in names})


def spec_or_agree(linear: bool, options: dict, bounds=None) -> LossSpec:
    """``LossSpec.from_options``; with a process or sequence group, a rejected option still joins the cross-rank
    agreements, so that every rank raises (wpkl/parallel/agree.py: ``reject``; sequence.py: ``reject_sequences``),
    never leaving the others in a collective."""
    for name in ("process_group", "sequence_group"):
        if options.get(name) is not None:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(f"{name} needs torch.distributed initialized (init_process_group)")
    try:
        return LossSpec.from_options(linear=linear, **options)
    except (TypeError, ValueError) as error:
        from ..parallel.agree import reject
        from ..parallel.sequence import reject_sequences

        rejecters = (("process_group", reject), ("sequence_group", lambda g, e: reject_sequences(g, e, bounds)))
        for name, rejecter in rejecters:
            if options.get(name) is not None:
                try:
                    rejecter(options[name], error)
                except (TypeError, ValueError):
                    pass  # this rank's own error, raised once every group has heard of it
        raise


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
    sampled_power: float | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    inplace_backward: bool = False,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk_mode: str = "tail",
    topk_logprob_floor: float | None = None,
    topk_loss_max: float | None = None,
    process_group=None,
    sequence_ids: torch.Tensor | None = None,
    sequence_group=None,
    sequence_bounds: tuple[int, int] | None = None,
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
        backend: "auto", "triton", "torch" or "reference" (wpkl/engine/route.py says which runs when).
        num_items_in_batch: for "mean", divide by this count (e.g. the valid tokens of all micro-batches and
            ranks, for gradient accumulation) instead of the local valid-token count: a number, or a tensor on
            the logits' device (a CPU tensor with CUDA logits is copied to the GPU: a host sync).
        teacher_logprobs: "sampled" only, leading shape: log q(y) of the sampled tokens, given instead of
            ``teacher_logits`` (pass None for those), e.g. from a teacher server. No confidence weighting then.
        rollout_logprobs: "sampled" only, leading shape: log p(y) under the policy that sampled y (e.g. vLLM's),
            used in the advantage a = log q(y) - log p(y) as TRL's IW-OPD does.
        sampled_power: "sampled" only: PowerOPD's alpha (arXiv 2606.17199; its authors use 5). The advantage
            becomes a = q(y)^alpha - p(y)^alpha (p(y) the behaviour's, as above) instead of the log-ratio: the
            loss is -a log p(y), the reported divergence stays log p(y) - log q(y). None: the log-ratio.
        teacher_token_logprobs: leading shape: log q(y) of the sampled tokens, for weightings that need it
            (``Weighting(prefix_confidence=...)``). Without it they use ``teacher_logprobs`` ("sampled"), or
            compute it from ``teacher_logits`` and ``tokens`` (a second read of the teacher's valid rows).
        teacher_topk_ids, teacher_topk_logprobs: a teacher given as its top-k tokens per position (a teacher
            server's answer), instead of ``teacher_logits`` (pass None there): int ids [..., K] (global vocabulary
            ids, -1 pads a shorter list) and the teacher's full-vocabulary log-probabilities of them [..., K]
            (-inf allowed; used as given, no temperature). Divergences: forward_kl, reverse_kl, jsd.
        topk_mode: "tail" (the K atoms plus one tail atom holding the rest of each distribution's mass: TRL's
            convention), "renormalize" (both restricted to the K atoms and renormalized) or "raw" (the atoms as
            given: verl's top-k forward KL). See wpkl/reference/topk.py: topk_atom_terms.
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
            [k, N] per call, none in backward; a top-k teacher: the student's statistics, then one of the atoms'
            logits [N, K]; jsd: a third, of its second pass's sums [4, N]); weights and reduction run in torch; ``inplace_backward`` is ignored. Collectives and bytes: docs/design.md.
            Inputs are checked on every rank, then one all-gather of their shapes makes every rank raise (or
            none) before any other collective. Every rank of the group must make the call (and its backward).
        sequence_ids: int >= 0, leading shape: the sequence each token belongs to (the same id on every rank of a
            ``sequence_group``). With ``positions`` it places each token in its sequence, in any order (a packed
            batch whose positions do not restart at 0, or a rank's share of a sequence-parallel batch): every token,
            masked or not, must have its own (sequence, position), without gaps. [B, T] input with a
            ``sequence_group`` defaults to row b being sequence b.
        sequence_group: a ``torch.distributed.ProcessGroup`` over which the batch's sequences are split (context or
            sequence parallelism: Megatron's context-parallel group, Ulysses, ring attention), or None. Each rank
            passes its own tokens with ``positions`` (each token's position in its whole sequence) and
            ``sequence_ids``; the weights and the reduction are the whole batch's, so the ranks' losses sum to the
            single-process loss of the whole batch and each rank's gradient is its rows of the whole gradient
            (``reduction="none"`` and the stats: the rank's tokens' rows). ``wpkl.distributed`` has the layout
            helpers of the trainers (Megatron's load-balanced chunks, Ulysses/verl's contiguous slices). Costs:
            an all-gather of eight float64 per rank (the agreement, read on the host: one host sync) and an
            all-reduce of the whole batch's [S, L] layout (7 float64 per place) per call, none in backward; with
            ``sequence_bounds``, the all-reduce alone and no host sync (the fused-linear form adds its
            compaction's). Combines with ``process_group`` (a tensor x context mesh). Every rank of the group
            must make the call. Details: wpkl/parallel/sequence.py and docs/recipes.md.
        sequence_bounds: with a ``sequence_group``: ``(S, L)``, the whole batch's number of sequences and a bound
            on its positions (every sequence id < S, every position in [0, L)), the same on every rank
            (``wpkl.distributed``'s helpers give it: ``part.bounds``; Megatron's padded [B, T]: ``(B, T)``). The
            call then reads nothing on the host (with ``process_group`` too, the vocabulary agreement still
            does, once): the agreement travels with the layout's all-reduce, and its errors are raised at once
            on the CPU and deferred on CUDA: a rank whose own inputs were rejected raises at once, the others at
            ``wpkl.check_errors()`` (call it on every rank, e.g. when logging: a bad value on one rank fails
            every rank's agreement); such calls never raise an earlier call's failure mid-call.

    Returns:
        The loss (float32, or float64 for float64 input): a scalar, or the leading shape for "none"; with
        ``return_stats=True`` a ``(loss, TokenStats)`` pair.
    """
    spec, data = split(locals(), linear=False)
    return materialized_loss(spec, **data)


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
    sampled_power: float | None = None,
    teacher_token_logprobs: torch.Tensor | None = None,
    chunk_size: int | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    topk_mode: str = "tail",
    topk_logprob_floor: float | None = None,
    topk_loss_max: float | None = None,
    process_group=None,
    sequence_ids: torch.Tensor | None = None,
    sequence_group=None,
    sequence_bounds: tuple[int, int] | None = None,
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
        chunk_size: tokens per chunk; None picks it from a 2 GiB budget (wpkl/engine/chunks.py states the formula).
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
        sequence_ids, sequence_group, sequence_bounds: as in ``weighted_kl_loss`` (the fused-linear form then runs
            two-phase).

    Memory and GEMMs: wpkl/engine/linear.py and chunks.py (module docstrings) and docs/design.md. Valid tokens are compacted
    first, which costs one host sync.
    """
    spec, data = split(locals(), linear=True)
    return linear_call(spec, data)


def linear_call(spec: LossSpec, data: dict):
    """The fused-linear form's call: an FSDP2 DTensor weight is gathered once (with a process group the weights
    are this rank's shard as given)."""
    if spec.process_group is None:
        for name in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):
            data[name] = gather_full(data.get(name))
    return linear_loss(spec, **data)
