"""OPD variants that combine two wpkl losses: ``entropy_gated_loss`` (EOPD, arXiv 2603.07079).

The other variants are options of one call: PowerOPD is ``sampled_power=``, PW-OPSD ``PositionSigmoid``, TIP
``TokenImportance`` (docs/recipes.md, "OPD variants").
"""

from __future__ import annotations

import inspect

import torch

from ..reference import entropy_gate
from .functional import fused_linear_kl_loss, weighted_kl_loss

# Options of the on-policy term that the gated forward-KL term does not take (unless ``gate_options`` gives them).
_SAMPLED_ONLY = ("rollout_logprobs", "sampled_power", "teacher_logprobs")


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
    return_stats = bound.arguments.pop("return_stats", False)
    first = dict(bound.arguments)
    base, stats = fn(**first, return_stats=True)
    entropy = stats.teacher_entropy if teacher_entropy is None else teacher_entropy
    gate = entropy_gate(entropy.detach().to(torch.float32), float(threshold))
    user = first.get("token_weights")
    weights = gate * alpha if user is None else gate * alpha * user.to(gate.device, torch.float32)
    second = {k: v for k, v in first.items() if k not in _SAMPLED_ONLY}
    second.update(divergence="forward_kl", weighting=None, token_weights=weights)
    second.update(gate_options or {})
    gated = fn(**second)
    loss = base + gated
    return (loss, stats, gate) if return_stats else loss
