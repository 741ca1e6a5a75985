"""The public modules: ``WeightedKLLoss`` and ``FusedLinearWeightedKLLoss`` hold a ``LossSpec`` (built, and so
validated, at construction: a bad option fails there, not at the first training step) and take the data in
``forward``. Every option of the matching function is a constructor argument (``return_stats``: a forward
argument) and a property that reads, or replaces, ``self.spec``; every data argument of the function is a forward
argument. tests/test_signatures.py derives both from the functions' signatures.
"""

from __future__ import annotations

from torch import nn

from ..engine.run import materialized_loss
from ..spec import LossSpec
from ..weighting import Weighting
from .functional import linear_call, spec_or_agree


class _SpecModule(nn.Module):
    _linear = False

    def __init__(self, **options):
        super().__init__()
        self.spec = LossSpec.from_options(linear=self._linear, **options)

    def _spec_for(self, return_stats, sequence_bounds=None) -> LossSpec:
        """The spec of one forward: ``return_stats`` is the only option a forward sets (its True variant is kept).
        ``sequence_bounds``: the forward's, so that a rejected ``return_stats`` joins the same agreement."""
        if return_stats is self.spec.return_stats:
            return self.spec
        cached = self.__dict__.get("_stats_spec")
        if return_stats is True and cached is not None and cached[0] is self.spec:
            return cached[1]
        spec = spec_or_agree(self._linear, {**self.spec.options(), "return_stats": return_stats}, sequence_bounds)
        if return_stats is True:
            self.__dict__["_stats_spec"] = (self.spec, spec)
        return spec

    def extra_repr(self) -> str:
        default = LossSpec.from_options(linear=self._linear).options()
        shown = ("divergence", "beta", "temperature", "reduction", "weighting")
        options = self.spec.options()
        names = [*shown, *(n for n in options if n not in shown and n not in LossSpec.group_names() and options[n] != default[n])]
        return ", ".join(f"{name}={options[name]!r}" for name in names)


def _option(name: str) -> property:
    def get(self):
        return self.spec.options()[name]

    def set_(self, value):
        self.spec = self.spec.replace(**{name: value})

    return property(get, set_, doc=f"The ``{name}`` option (``self.spec``; setting it validates a new spec).")


class WeightedKLLoss(_SpecModule):
    """``weighted_kl_loss`` with its configuration held by a module, for trainers that expect one."""

    def __init__(self, weighting: Weighting | None = None, divergence: str = "reverse_kl", beta: float = 0.5,
                 temperature: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 inplace_backward: bool = False, process_group=None, *, topk_mode: str = "tail",
                 topk_logprob_floor: float | None = None, topk_loss_max: float | None = None, sequence_group=None,
                 sampled_power: float | None = None):
        super().__init__(weighting=weighting, divergence=divergence, beta=beta, temperature=temperature,
                         reduction=reduction, backend=backend, inplace_backward=inplace_backward,
                         process_group=process_group, topk_mode=topk_mode, topk_logprob_floor=topk_logprob_floor,
                         topk_loss_max=topk_loss_max, sequence_group=sequence_group, sampled_power=sampled_power)

    def forward(self, student_logits, teacher_logits, mask=None, token_weights=None, positions=None, tokens=None,
                return_stats=False, num_items_in_batch=None, teacher_token_logprobs=None, *, teacher_logprobs=None,
                rollout_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None, sequence_ids=None,
                sequence_bounds=None):
        return materialized_loss(
            self._spec_for(return_stats, sequence_bounds), student_logits, teacher_logits, mask=mask, token_weights=token_weights,
            positions=positions, tokens=tokens, num_items_in_batch=num_items_in_batch,
            teacher_token_logprobs=teacher_token_logprobs, teacher_logprobs=teacher_logprobs,
            rollout_logprobs=rollout_logprobs, teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs, sequence_ids=sequence_ids, sequence_bounds=sequence_bounds)


class FusedLinearWeightedKLLoss(_SpecModule):
    """``fused_linear_kl_loss`` with its configuration held by a module (the same split as ``WeightedKLLoss``)."""

    _linear = True

    def __init__(self, weighting: Weighting | None = None, divergence: str = "reverse_kl", beta: float = 0.5,
                 temperature: float = 1.0, reduction: str = "mean", backend: str = "auto", *,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None,
                 chunk_size: int | None = None, process_group=None, topk_mode: str = "tail",
                 topk_logprob_floor: float | None = None, topk_loss_max: float | None = None, sequence_group=None,
                 sampled_power: float | None = None):
        super().__init__(weighting=weighting, divergence=divergence, beta=beta, temperature=temperature,
                         reduction=reduction, backend=backend, student_logit_scale=student_logit_scale,
                         teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                         teacher_softcap=teacher_softcap, chunk_size=chunk_size, process_group=process_group,
                         topk_mode=topk_mode, topk_logprob_floor=topk_logprob_floor, topk_loss_max=topk_loss_max,
                         sequence_group=sequence_group, sampled_power=sampled_power)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, mask=None, token_weights=None,
                positions=None, tokens=None, return_stats=False, *, student_bias=None, teacher_bias=None,
                num_items_in_batch=None, teacher_logprobs=None, rollout_logprobs=None, teacher_token_logprobs=None,
                teacher_topk_ids=None, teacher_topk_logprobs=None, sequence_ids=None, sequence_bounds=None):
        data = dict(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                    teacher_weight=teacher_weight, mask=mask, token_weights=token_weights, positions=positions,
                    tokens=tokens, student_bias=student_bias, teacher_bias=teacher_bias,
                    num_items_in_batch=num_items_in_batch, teacher_logprobs=teacher_logprobs,
                    rollout_logprobs=rollout_logprobs, teacher_token_logprobs=teacher_token_logprobs,
                    teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
                    sequence_ids=sequence_ids, sequence_bounds=sequence_bounds)
        return linear_call(self._spec_for(return_stats, sequence_bounds), data)


for _cls in (WeightedKLLoss, FusedLinearWeightedKLLoss):
    for _name in LossSpec.option_names(_cls._linear):
        setattr(_cls, _name, _option(_name))
del _cls, _name
