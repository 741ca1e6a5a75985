"""OPD variants that combine several wpkl losses: ``entropy_gated_loss`` (EOPD, arXiv 2603.07079) and
``multi_teacher_loss`` (MOPD, arXiv 2606.30406).

The other variants are options of one call: PowerOPD is ``sampled_power=``, PW-OPSD ``PositionSigmoid``, TIP
``TokenImportance`` (docs/recipes.md, "OPD variants").
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch

from ..backends.projection import gather_full
from ..engine.run import mixture_loss
from ..reference import entropy_gate, mix_teachers
from .functional import fused_linear_kl_loss, split, weighted_kl_loss

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


def _mixing_kind(mixing) -> str:
    """What the host knows of the mixing without a device sync (wpkl/engine/route.py: ``mixture_route``):
    "dense" (numbers, or a tensor given on the CPU with some token of several teachers), "routing" (a tensor on
    the CPU with at most one teacher nonzero per token), "device" (a tensor on a device: not read)."""
    if not isinstance(mixing, torch.Tensor):
        return "dense"
    if mixing.device.type != "cpu":
        return "device"
    return "routing" if bool(((mixing.detach() != 0).sum(0) <= 1).all()) else "dense"


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

    Cost, in reads of each student row (forward and backward each), on the Triton backend: teachers of one form
    share one pass that reads it once (wpkl/engine/mixture.py): logits of one dtype (or, fused_linear, hidden-state
    teachers: the student's chunk projected once for them) with reverse or forward KL, up to four per pass
    (kernels/token_mixture.py), or jsd, two per pass; top-k teachers, any number, every divergence (their atoms
    merged in one backward); the sampled-token loss's logits, log q(y) and (dense) hidden-state teachers, any number
    (wpkl/backends/triton_sampled.py); logits (fused-linear, dense mixing: hidden-state) and top-k teachers
    together, the top-k ones joining the first pass of the others (wpkl/backends/triton_logits_topk.py); on
    vocabulary shards, the logits teachers with reverse or forward KL or jsd, any number, their statistics merged at once
    (wpkl/parallel/shard_mixture.py; fused-linear with dense mixing, the hidden-state teachers, one merge per
    chunk), the sampled-token loss's teachers, and top-k teachers (wpkl/parallel/shard_topk.py: one merge of the
    student's statistics and one gather of all their atoms; beside logits or hidden-state teachers, joining the
    first launch of those). Every other teacher (the only teacher of its form or logits dtype, a teacher with its
    own options unless others share them, the torch backend) runs its own pass, reading
    only the rows its teacher has a nonzero weight on (a masked row reads nothing). Mixing numbers, and mixing
    tensors given on the CPU with tokens of several teachers, take every shared pass; a mixing tensor on the GPU
    (not read on the host) the logits, top-k and sampled-token ones; a one-hot tensor given on the CPU (a routing:
    one teacher per token) the top-k and sampled-token ones only, the other teachers one pass each, which reads each
    row once in all and does one teacher's work per element. Then the weights and the reduction run once, in torch,
    on the mixed per-token terms: on every layout (``sequence_ids``, ``sequence_group``, ``process_group``), with
    every weighting, one call, no extra no-grad passes. The fused-linear form runs two-phase. A teacher's dict may
    carry its own options (``teacher_softcap``, ...).
    A teacher whose mixing weight is 0 on a token contributes nothing there, whatever its values (an infinite
    divergence, an unknown confidence): it does not see the token (nor are its values checked there), and the
    reduction's denominators are the call's. A valid token no teacher weighs has loss 0; the first teacher computes
    its student entropy (for TIP and the stats), at weight 0. Returns the loss, or with ``return_stats=True``
    ``(loss, stats)`` with the mixed stats.
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
    weighting = shared.get("weighting")
    if weighting is not None and weighting.confidence:
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
    if weighting is not None and weighting.needs_teacher_token_logprobs and shared.get("teacher_token_logprobs") is None:
        raise ValueError("multi_teacher_loss with prefix_confidence needs teacher_token_logprobs: the mixed "
                         "teacher's log q(y) of the sampled tokens, or one per teacher (the engine would compute "
                         "it from the first teacher alone)")

    # teacher_weight, ...: the projection of hidden-state teachers, shared or their own; the others get its default
    parameters = inspect.signature(fn).parameters
    unprojected = {name: None if parameters[name].default is inspect.Parameter.empty else parameters[name].default
                   for name in names[1:] if name not in _TEACHER_DATA}
    bound.apply_defaults()
    full = {**{name: None for name in parameters}, **bound.arguments,  # (the teacher: required, given below)
            **{k: v for k, v in shared.items() if k == "teacher_token_logprobs"}}
    spec, data = split(full, linear=fused_linear)
    if fused_linear and spec.process_group is None:
        for name in ("student_weight", "student_bias"):
            data[name] = gather_full(data.get(name))

    def teacher_data(source, mask):
        """(the teacher's spec: the call's, with the teacher's own options such as teacher_softcap, its data)."""
        own = {k: v for k, v in source.items() if k != "teacher_token_logprobs"}
        projection = {} if source[names[0]] is not None else unprojected
        merged = {**data, **{k: v for k, v in {**projection, **own}.items() if k in data}, "mask": mask}
        if fused_linear and spec.process_group is None:
            for name in ("teacher_weight", "teacher_bias"):
                merged[name] = gather_full(merged.get(name))
        options = {**{k: v for k, v in projection.items() if k not in data},
                   **{k: v for k, v in own.items() if k not in data}}
        return (split({**full, **options}, linear=fused_linear)[0] if options else spec), merged

    valid = (torch.ones(leading, dtype=torch.bool, device=student.device) if data.get("mask") is None
             else data["mask"].bool())
    kept = [(source, m) for source, m in zip(sources, weights, strict=True)
            if isinstance(m, torch.Tensor) or m != 0]  # a teacher of weight 0 counts nowhere
    base = teacher_data(kept[0][0], data.get("mask"))[1]
    # A teacher's own mask drops the tokens its weight is 0 on (0 * an infinite divergence would be NaN). Tokens
    # no teacher weighs stay with the first (its weight 0 there): their student entropy is known, their values
    # (tokens, positions) checked.
    masks = [valid & (m != 0) if isinstance(m, torch.Tensor) else data.get("mask") for _, m in kept]
    if isinstance(masks[0], torch.Tensor):
        unseen = valid.clone()
        for m in masks:
            unseen &= ~m
        masks[0] = masks[0] | unseen
    per_teacher = [teacher_data(source, mask) for (source, _), mask in zip(kept, masks, strict=True)]
    return mixture_loss(spec, fused_linear, base, per_teacher, [m for _, m in kept], mixing_kind=_mixing_kind(mixing))

