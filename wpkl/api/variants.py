"""OPD variants that combine several wpkl losses: ``entropy_gated_loss`` (EOPD, arXiv 2603.07079) and
``multi_teacher_loss`` (MOPD, arXiv 2606.30406).

The other variants are options of one call: PowerOPD is ``sampled_power=``, PW-OPSD ``PositionSigmoid``, TIP
``TokenImportance`` (docs/recipes.md, "OPD variants").
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence

import torch

from ..reference import compute_weights, entropy_gate, mix_teachers
from .functional import fused_linear_kl_loss, weighted_kl_loss

# Options of the on-policy term that the gated forward-KL term does not take (unless ``gate_options`` gives them).
_SAMPLED_ONLY = ("rollout_logprobs", "sampled_power", "teacher_logprobs")
# A teacher's data (one per teacher in multi_teacher_loss); the other teacher_ arguments describe the projection of
# hidden-state teachers and may be shared.
_TEACHER_DATA = ("teacher_logits", "teacher_hidden", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
                 "teacher_token_logprobs")


def entropy_gated_loss(*args, threshold: float = 0.8, alpha: float = 1.0, teacher_entropy: torch.Tensor | None = None,
                       gate_options: dict | None = None, fused_linear: bool = False, **options):
    """EOPD: the on-policy loss plus ``alpha`` times the forward KL on the tokens where the teacher is uncertain,

        loss = reduce_i [ L_i + alpha * 1[H_teacher,i >= threshold] * FKL_i ]          (arXiv 2603.07079, Eq. 9)

    with L_i the loss ``weighted_kl_loss(*args, **options)`` computes per token (its authors: ``divergence=
    "sampled"``, the sampled-token reverse KL) and FKL_i the forward KL of the same call's student against the
    teacher (their Eq. 10: over the teacher's top-16, renormalized: pass ``gate_options=dict(teacher_topk_ids=...,
    teacher_topk_logprobs=..., topk_mode="renormalize")``). Defaults are theirs: ``threshold=0.8`` nats on the
    teacher's full-vocabulary entropy, ``alpha=1``; both terms share the reduction (``"mean"``: each divided by
    all valid tokens, as their code does).

    Two wpkl calls (each fused, on any input form and parallel layout; ``fused_linear=True`` for
    ``fused_linear_kl_loss``'s arguments): the student's rows are read once per term. The gate's entropy is
    ``teacher_entropy`` when given (leading shape), else the first call's ``TokenStats.teacher_entropy`` (the
    teacher logits' entropy at the call's temperature; without teacher logits it is unknown: pass it).
    ``weighting`` applies to the on-policy term only; the gated term is ``alpha * gate * token_weights``.
    ``gate_options`` override the second call's options (its divergence defaults to ``"forward_kl"``).
    Returns the loss, or with ``return_stats=True`` ``(loss, stats of the first call, gate)``.
    """
    fn = fused_linear_kl_loss if fused_linear else weighted_kl_loss
    bound = inspect.signature(fn).bind_partial(*args, **options)
    teacher = bound.arguments.get("teacher_hidden" if fused_linear else "teacher_logits")
    if teacher_entropy is None and teacher is None:
        raise ValueError("entropy_gated_loss without teacher logits needs teacher_entropy (the teacher's per-token "
                         "entropy, leading shape): the gate cannot be computed from log q(y) or top-k data")
    for name, value in (("threshold", threshold), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ValueError(f"entropy_gated_loss: {name} must be a finite number, got {value!r}")
    if alpha < 0:
        raise ValueError(f"entropy_gated_loss: alpha must be >= 0, got {alpha}")
    _no_inplace("entropy_gated_loss", bound.arguments)
    return_stats = bound.arguments.pop("return_stats", False)
    first = dict(bound.arguments)
    base, stats = fn(**first, return_stats=True)
    entropy = stats.teacher_entropy if teacher_entropy is None else teacher_entropy
    gate = entropy_gate(entropy.detach().to(torch.float32), float(threshold))
    user = first.get("token_weights")
    weights = gate * alpha if user is None else gate * alpha * user.to(gate.device, torch.float32)
    second = {k: v for k, v in first.items() if k not in _SAMPLED_ONLY}
    if any(name.startswith("teacher_") and value is not None for name, value in (gate_options or {}).items()):
        # the gated term's own teacher (e.g. the teacher's top-16): the first call's teacher arguments leave
        second.update({name: None for name in _teacher_names(fn) if name in second})
    second.update(divergence="forward_kl", weighting=None, token_weights=weights)
    second.update(gate_options or {})
    gated = fn(**second)
    loss = base + gated
    return (loss, stats, gate) if return_stats else loss


def _no_inplace(name: str, arguments: dict) -> None:
    """Several fused calls share the student's logits: an in-place backward would overwrite them with one call's
    gradient while the others still read them (a silently wrong gradient)."""
    if arguments.get("inplace_backward"):
        raise ValueError(f"{name} makes several fused calls on the same student logits: inplace_backward=True would "
                         "overwrite them with the first call's gradient; pass inplace_backward=False")


def _teacher_names(fn) -> tuple[str, ...]:
    """The arguments of ``fn`` that describe the teacher (derived from its signature, never listed by hand)."""
    return tuple(name for name in inspect.signature(fn).parameters if name.startswith("teacher_"))


def _mixing(mixing, count: int, leading: torch.Size, device) -> list:
    """The K mixing weights, each a float or a float64 tensor broadcastable to the leading shape."""
    if mixing is None:
        return [1.0 / count] * count
    if isinstance(mixing, torch.Tensor):
        if mixing.dim() == 0 or mixing.shape[0] != count:
            raise ValueError(f"multi_teacher_loss: mixing must have {count} rows (one per teacher), "
                             f"got shape {tuple(mixing.shape)}")
        if mixing.dim() - 1 > len(leading) or tuple(mixing.shape[1:]) != tuple(leading[:mixing.dim() - 1]):
            raise ValueError(f"multi_teacher_loss: mixing of shape {tuple(mixing.shape)} must be [K] or [K, *p] with "
                             f"p a prefix of the tokens' leading shape {tuple(leading)} (e.g. [K, B] per sequence)")
        if not mixing.is_floating_point():
            raise TypeError(f"multi_teacher_loss: mixing must be floating point, got {mixing.dtype}")
        rows = mixing.detach().to(device, torch.float64)
        rows = rows.reshape(*rows.shape, *([1] * (len(leading) + 1 - rows.dim())))
        return [row for row in rows]
    if not isinstance(mixing, Sequence) or len(mixing) != count:
        raise ValueError(f"multi_teacher_loss: mixing must be None, {count} numbers or a [K, ...] tensor, got {mixing!r}")
    values = []
    for value in mixing:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
            raise ValueError(f"multi_teacher_loss: mixing weights must be finite numbers, got {value!r}")
        values.append(float(value))
    if not any(values):
        raise ValueError("multi_teacher_loss: the mixing weights are all 0: no teacher would count")
    return values


def _exclusion_coefficient(shared: dict, valid: torch.Tensor, leading) -> torch.Tensor | None:
    """d reduce / d (w_i L_i) per token, for calls that mask the tokens a teacher is routed away from; None where
    the layout hides the denominators (a sequence group's whole batch, packed sequences for "seq_mean")."""
    reduction = shared.get("reduction", "mean")
    if shared.get("sequence_group") is not None:
        return None
    dtype = torch.float64  # the engine takes the token weights in its own precision
    if reduction in ("none", "sum"):
        return torch.ones(leading, dtype=dtype, device=valid.device)
    if reduction == "mean":
        count = shared.get("num_items_in_batch")
        if count is None:
            count = valid.sum().clamp_min(1)
        elif not isinstance(count, torch.Tensor) and not count > 0:
            raise ValueError(f"num_items_in_batch must be a positive count, got {count!r}")
        count = torch.as_tensor(count, dtype=dtype, device=valid.device).reshape(())
        # no valid token: the loss is 0 whatever the count (as one call's)
        return torch.ones(leading, dtype=dtype, device=valid.device) / torch.where(valid.any(), count, 1.0)
    if reduction == "seq_mean" and len(leading) == 2 and shared.get("sequence_ids") is None:
        counts = valid.sum(dim=-1, keepdim=True)
        sequences = (counts > 0).sum().clamp_min(1)
        return (1.0 / (counts.clamp_min(1) * sequences).to(dtype)).expand(leading)
    return None


def multi_teacher_loss(*args, teachers, mixing=None, fused_linear: bool = False, **options):
    """MOPD: the student against several teachers, each token's divergences mixed,

        loss = reduce_i [ w_i * sum_k m_k,i * D_k,i ]                     (arXiv 2606.30406, Eq. 5: sum_k w_k D_KL)

    with D_k,i the divergence ``weighted_kl_loss(*args, **options)`` computes against teacher k and w_i the
    ``weighting``'s weight evaluated on the mixed per-token quantities (divergence sum_k m_k D_k, teacher confidence
    sum_k m_k c_k; ``prefix_confidence`` reads ``teacher_token_logprobs``: give the mixed log q(y) in ``options``, or
    one per teacher, mixed the same way). The paper's per-teacher weights are ``mixing=[w_1, ..., w_K]``; its routing
    of each prompt to its domain's teacher is a one-hot ``mixing`` of shape [K, B] (per sequence) or [K, *leading]
    (per token). ``mixing=None`` is the uniform 1/K. The weights are used as given (not renormalized).

    ``teachers``: a list, each a tensor (the teacher logits, or for ``fused_linear=True`` the teacher hidden states
    with ``teacher_weight`` from ``options``) or a dict of the call's teacher arguments (``teacher_logits``,
    ``teacher_logprobs``, ``teacher_topk_ids`` and ``teacher_topk_logprobs``, ...): teachers of different forms mix.
    Every other argument (``args``, ``options``: mask, tokens, divergence, temperature, reduction,
    ``process_group``, ``sequence_group``, ...) is shared.

    Cost: one fused call per teacher with the gradient, plus one no-grad call per teacher when the weights read the
    teachers (``confidence``, ``disagreement``, ``accumulated``, ``prefix_confidence``, ``token_importance``) or with
    ``return_stats``, and one no-grad call when they only normalize, cap (``normalize``, ``w_max``) or follow a
    routing tensor. Each call reads the student's rows once: the student is read K to 2K + 1 times, not once (no kernel reads K teachers in one
    pass yet). Weights that read the teachers are computed from the mixed stats on one sequence per row ([B, T]
    inputs, or flat inputs when the weighting needs no sequences): with ``sequence_ids`` or ``sequence_group`` only
    teacher-independent weightings (position kinds, ``token_weights``, ``normalize``, ``w_max``) are supported.
    The weights are computed from the float32 ``TokenStats`` (as every wpkl weight is from float32 terms). A
    teacher whose mixing weight is 0 on a token contributes nothing there, whatever its values (an infinite
    divergence, an unknown confidence): its call masks the token, the reduction's denominators kept in the token
    weights (not with ``sequence_group``, nor "seq_mean" on packed sequences: there 0 * inf is NaN). Returns the loss, or with ``return_stats=True`` ``(loss, stats)`` with the
    mixed stats.
    """
    fn = fused_linear_kl_loss if fused_linear else weighted_kl_loss
    names = _teacher_names(fn)
    bound = inspect.signature(fn).bind_partial(*args, **options)
    shared = dict(bound.arguments)
    _no_inplace("multi_teacher_loss", shared)
    given = [name for name in names if shared.get(name) is not None and name in _TEACHER_DATA
             and name != "teacher_token_logprobs"]
    if given:
        raise ValueError(f"multi_teacher_loss: give the teachers in teachers=[...], not {', '.join(given)}")
    if isinstance(teachers, (torch.Tensor, Mapping)) or not isinstance(teachers, Sequence) or not teachers:
        raise ValueError("multi_teacher_loss: teachers must be a non-empty list of tensors or dicts")
    sources = []
    for k, teacher in enumerate(teachers):
        if isinstance(teacher, torch.Tensor):
            teacher = {names[0]: teacher}
        if not isinstance(teacher, Mapping):
            raise TypeError(f"multi_teacher_loss: teacher {k} must be a tensor or a dict, got {type(teacher).__name__}")
        unknown = sorted(set(teacher) - set(names))
        if unknown:
            raise ValueError(f"multi_teacher_loss: teacher {k} has {', '.join(unknown)}; a teacher's arguments are "
                             f"{', '.join(names)}")
        sources.append({names[0]: None, **teacher})
    student = shared[next(iter(inspect.signature(fn).parameters))]
    leading = student.shape[:-1]
    weights = _mixing(mixing, len(sources), leading, student.device)
    return_stats = shared.pop("return_stats", False)
    weighting = shared.pop("weighting", None)
    user = shared.pop("token_weights", None)
    reads_teachers = weighting is not None and bool(
        weighting.confidence or weighting.disagreement or weighting.accumulated
        or weighting.prefix_confidence is not None or weighting.token_importance is not None)
    if reads_teachers and (shared.get("sequence_group") is not None or shared.get("sequence_ids") is not None
                           or len(leading) not in (1, 2) or (len(leading) == 1 and weighting.needs_sequences)):
        raise ValueError(
            "multi_teacher_loss: weights that read the teachers (confidence, disagreement, accumulated, "
            "prefix_confidence, token_importance) are computed on [B, T] batches (or flat ones when the weighting "
            "needs no sequences); with sequence_ids or sequence_group use a teacher-independent weighting")
    if reads_teachers and weighting.confidence:
        blind = [k for k, source in enumerate(sources)
                 if source[names[0]] is None and source.get("teacher_topk_ids") is None]
        if blind:
            raise ValueError(f"multi_teacher_loss: Weighting(confidence=...) needs each teacher's distribution; "
                             f"teacher(s) {blind} give only teacher_logprobs, which carry no confidence")
    own = [source.get("teacher_token_logprobs") for source in sources]
    if any(value is not None for value in own):
        if not all(value is not None for value in own) or shared.get("teacher_token_logprobs") is not None:
            raise ValueError("multi_teacher_loss: give teacher_token_logprobs either once (the mixed teacher's "
                             "log q(y)) or in every teacher's dict (mixed by the mixing weights), not both or some")
        shared["teacher_token_logprobs"] = mix_teachers(own, weights)
    if reads_teachers and weighting.prefix_confidence is not None and shared.get("teacher_token_logprobs") is None:
        raise ValueError("multi_teacher_loss with prefix_confidence needs teacher_token_logprobs: the mixed "
                         "teacher's log q(y) of the sampled tokens, or one per teacher")

    # teacher_weight, ...: the projection of hidden-state teachers, shared or their own; the others get its default
    parameters = inspect.signature(fn).parameters
    unprojected = {name: None if parameters[name].default is inspect.Parameter.empty else parameters[name].default
                   for name in names[1:] if name not in _TEACHER_DATA}

    def call(source, **extra):
        own = {k: v for k, v in source.items() if k != "teacher_token_logprobs"}
        base = shared if source[names[0]] is not None else {**shared, **unprojected}
        return fn(**{**base, **own, **extra})

    stats = w = None
    nonlinear = weighting is not None and (weighting.normalize or weighting.w_max is not None)
    if reads_teachers or return_stats:
        # teacher-independent rules weigh here as in the loss; rules that read the teachers weigh the mixture below
        rule = None if reads_teachers else weighting
        with torch.no_grad():
            per_teacher = [call(source, weighting=rule, token_weights=user, return_stats=True)[1] for source in sources]
        mixed = {field: mix_teachers([getattr(s, field) for s in per_teacher], weights)
                 for field in ("divergence", "teacher_confidence", "teacher_entropy")}
        stats = dataclasses.replace(per_teacher[0], **mixed)
        w = stats.weight if nonlinear else None
    if reads_teachers:
        rows = (lambda x: x) if len(leading) == 2 else (lambda x: x.reshape(1, -1))
        positions = shared.get("positions")
        token_logprobs = shared.get("teacher_token_logprobs")
        w = compute_weights(
            weighting, valid=rows(stats.mask), divergence=rows(stats.divergence),
            confidence=rows(stats.teacher_confidence),
            user_weights=None if user is None else rows(user.detach().float()),
            positions=None if positions is None else rows(positions),
            teacher_token_logprobs=None if token_logprobs is None else rows(token_logprobs.detach().float()),
            student_entropy=rows(stats.student_entropy)).reshape(leading)
        stats = dataclasses.replace(stats, weight=w)
    routed = isinstance(mixing, torch.Tensor)  # a tensor may route tokens away from a teacher (weight 0)
    valid = (torch.ones(leading, dtype=torch.bool, device=student.device) if shared.get("mask") is None
             else shared["mask"].bool())
    if w is None and (nonlinear or routed):
        if weighting is None:
            w = torch.where(valid, 1.0 if user is None else user.detach().float(), 0.0)
        else:
            with torch.no_grad():
                w = call(sources[0], weighting=weighting, token_weights=user, return_stats=True)[1].weight
    # Where a teacher's weight is 0 its call masks the token (0 * an infinite divergence would be NaN), with the
    # reduction's coefficients in the token weights (the masks differ, the denominators must not).
    coefficient = _exclusion_coefficient(shared, valid, leading) if routed else None
    loss = None
    for source, m in zip(sources, weights, strict=True):
        if not isinstance(m, torch.Tensor) and m == 0:
            continue  # this teacher counts nowhere
        if coefficient is not None:
            term = call(source, weighting=None, token_weights=w * m * coefficient, mask=valid & (m != 0),
                        reduction="none" if shared.get("reduction", "mean") == "none" else "sum",
                        num_items_in_batch=None)
        elif w is not None:  # the weights are known: the calls only mix
            term = call(source, weighting=None, token_weights=w * m)
        else:  # the rule is linear in the token weights: each call weighs by itself
            scaled = m if user is None else user * m
            if not isinstance(scaled, torch.Tensor):
                scaled = torch.full(leading, scaled, dtype=torch.float64, device=student.device)
            term = call(source, weighting=weighting, token_weights=scaled.expand(leading))
        loss = term if loss is None else loss + term
    return (loss, stats) if return_stats else loss
