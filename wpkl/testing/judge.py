"""The rule every comparison with the float64 reference uses (wpkl's own tests and ``check_loss``).

Values: losses accumulate in float32 whatever the logits' dtype, so a value may be off the truth by float32
rounding: ``|x - truth| <= 2 |torch - truth| + VALUE_TOL (atol + rtol |truth|)``.

Gradients are stored in the logits' dtype: elementwise,
``|g - truth| <= 2 e_row + rtol |truth| + atol max |truth|``, where ``e_row`` is the largest error of plain torch in
the element's row (its token), plain torch computing the same loss in float32 from the same rounded inputs, its
gradient rounded to the logits' dtype (what a correct implementation in that dtype cannot beat). Row-wise, because
float32 gradient errors are (an error in the row's log-normalizer times each probability): an element where plain
torch happened to round luckily does not set the bar. (rtol, atol) are the small terms of ``GRAD_TOL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VALUE_TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-4),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.float64: dict(rtol=1e-9, atol=1e-12),
}


@dataclass(frozen=True)
class Judgement:
    error: float  # the largest |x - truth|
    limit: float  # the bound at the worst element (the one with the largest error / bound)
    ratio: float  # max error / bound: <= 1 passes
    index: int  # flat index of the worst element (-1: none)
    finite_mismatch: bool  # x is non-finite where the truth is finite, or the other way round

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0 and not self.finite_mismatch


def _judge(actual, truth, baseline, bound_extra, typical: bool = False) -> Judgement:
    shape = actual.shape if actual.dim() else (1,)
    actual, truth, baseline = (x.detach().double().cpu().reshape(-1) for x in (actual, truth, baseline))
    mismatch = bool((torch.isfinite(actual) != torch.isfinite(truth)).any())
    both = torch.isfinite(actual) & torch.isfinite(truth)
    diff = torch.where(both, (actual - truth).abs(), 0.0)
    base = torch.where(both & torch.isfinite(baseline), (baseline - truth).abs(), 0.0)
    if typical and base.numel():
        # plain torch's worst error in each row (token): float32 gradient errors are row-wise (an error in the
        # row's log-normalizer, times each probability), so an element where plain torch happened to round
        # luckily does not set the bar
        rows = base.view(shape)
        base = torch.maximum(rows, rows.amax(-1, keepdim=True)).reshape(-1)
    bound = 2 * base + bound_extra(torch.where(both, truth, 0.0)) + 1e-30
    if actual.numel() == 0:
        return Judgement(0.0, 0.0, 0.0, -1, mismatch)
    excess = diff / bound
    i = int(excess.argmax())
    return Judgement(float(diff.max()), float(bound[i]), float(excess[i]), i, mismatch)


def judge_value(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor) -> Judgement:
    return _judge(actual, truth, baseline, lambda t: VALUE_TOL["atol"] + VALUE_TOL["rtol"] * t.abs())


def judge_grad(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> Judgement:
    tol = GRAD_TOL[dtype]

    def extra(t):
        scale = float(t.abs().max()) if t.numel() else 0.0
        return tol["rtol"] * t.abs() + tol["atol"] * scale

    return _judge(actual, truth, baseline, extra, typical=True)
