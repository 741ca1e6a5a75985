"""``check_loss``: a distillation loss judged against wpkl's float64 reference on named cases and dtypes."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch

from .cases import Batch, select
from .judge import judge_grad, judge_value

DEFAULT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class CaseResult:
    case: str
    dtype: str
    passed: bool
    value_error: float = float("nan")
    value_limit: float = float("nan")
    grad_error: float = float("nan")
    grad_limit: float = float("nan")
    ratio: float = float("nan")  # the worst error / limit of the value and the gradient (<= 1 passes)
    seconds: float = float("nan")
    message: str = ""  # why it failed (or was skipped)
    skipped: bool = False


@dataclass
class LossReport:
    results: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def __str__(self) -> str:
        rows = [("case", "dtype", "value err", "limit", "grad err", "limit", "ms", "result")]
        for r in self.results:
            verdict = "skipped" if r.skipped else "pass" if r.passed else "FAIL"
            rows.append((r.case, r.dtype, f"{r.value_error:.2e}", f"{r.value_limit:.2e}", f"{r.grad_error:.2e}",
                         f"{r.grad_limit:.2e}", f"{1e3 * r.seconds:.1f}",
                         verdict + (f": {r.message}" if r.message else "")))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows]
        total = len(self.results)
        lines.append(f"{total - len(self.failures)} of {total} passed" + ("" if self.passed else
                     f"; {len(self.failures)} failed"))
        return "\n".join(lines)


def _accepts(fn, name: str) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def wpkl_reference(divergence: str, beta: float, reduction: str):
    """The default reference: ``weighted_kl_loss`` on the reference backend (float64 for float64 input)."""

    def reference(student, teacher, mask, *, temperature, tokens=None):
        from ..api import weighted_kl_loss

        return weighted_kl_loss(student, teacher, mask=mask, tokens=tokens, divergence=divergence, beta=beta,
                                temperature=temperature, reduction=reduction, backend="reference")

    return reference


def _loss_and_grad(fn, student, teacher, mask, upstream, **extra):
    leaf = student.detach().clone().requires_grad_(True)
    loss = fn(leaf, teacher, mask, **extra)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"fn returned {type(loss).__name__}, not a tensor")
    if loss.requires_grad:
        (loss.double() * upstream.to(loss.device)).sum().backward() if loss.dim() else loss.backward()
    return loss, leaf.grad


def _one(fn, reference, batch: Batch, dtype, device, reduction, temperature, divergence, generator, name):
    fail = lambda message, **kw: CaseResult(name, str(dtype).removeprefix("torch."), False, message=message, **kw)  # noqa: E731
    temperature = batch.temperature or temperature
    extra = {}
    if batch.temperature is not None:
        if not _accepts(fn, "temperature"):
            return CaseResult(name, str(dtype).removeprefix("torch."), True, skipped=True,
                              message="fn takes no temperature=")
        extra["temperature"] = temperature
    student, teacher, mask = batch.student.to(dtype), batch.teacher.to(dtype), batch.mask
    tokens = None
    if divergence == "sampled":
        probs = torch.softmax(student.double()[..., :].nan_to_num(neginf=-1e300) / temperature, -1)
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(mask.shape)
        extra["tokens"] = tokens.to(device)
    B, T = mask.shape
    upstream = (torch.rand(B, T, generator=generator, dtype=torch.float64) + 0.5 if reduction == "none"
                else torch.ones((), dtype=torch.float64))
    ref_kwargs = dict(temperature=temperature, tokens=tokens)
    # The references run where fn does (float64 on a GPU holds a production-size row; the CPU would take minutes).
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    ref_kwargs["tokens"] = on(tokens)
    truth, truth_grad = _loss_and_grad(reference, on(student.double()), on(teacher.double()), on(mask), upstream,
                                       **ref_kwargs)
    base, base_grad = _loss_and_grad(reference, on(student.float()), on(teacher.float()), on(mask), upstream,
                                     **ref_kwargs)
    start = time.perf_counter()
    try:
        loss, grad = _loss_and_grad(fn, student.to(device), teacher.to(device), mask.to(device), upstream, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as error:  # noqa: BLE001 - a loss that raises is a failed result, never the checker's exception
        return fail(f"fn raised {type(error).__name__}: {error}".splitlines()[0][:200])
    seconds = time.perf_counter() - start
    expected_shape = tuple(mask.shape) if reduction == "none" else ()
    if tuple(loss.shape) != expected_shape and not (expected_shape == () and loss.numel() == 1):
        return fail(f"loss has shape {tuple(loss.shape)}, expected {expected_shape}", seconds=seconds)
    loss = loss.reshape(expected_shape)
    value = judge_value(loss, truth, base)
    common = dict(value_error=value.error, value_limit=value.limit, ratio=value.ratio, seconds=seconds)
    if not torch.isfinite(loss.detach()).all():
        return fail("the loss is not finite", **common)
    if not value.passed:
        return fail("the loss is off the reference", **common)
    if grad is None:
        return fail("no gradient reached the student logits", **common)
    if grad.dtype != dtype or grad.shape != student.shape:
        return fail(f"the gradient is {grad.dtype} {tuple(grad.shape)}, expected {dtype} {tuple(student.shape)}",
                    **common)
    g = judge_grad(grad, truth_grad, base_grad.to(dtype), dtype)
    common.update(grad_error=g.error, grad_limit=g.limit, ratio=max(value.ratio, g.ratio))
    if g.finite_mismatch:
        return fail("the gradient is not finite where the reference's is (NaN from -inf logits?)", **common)
    if bool((grad.detach().cpu()[~mask] != 0).any()):
        return fail("the gradient is not exactly 0 on masked tokens", **common)
    if not g.passed:
        return fail(f"the gradient is off the reference ({g.ratio:.1f}x the limit at flat index {g.index})", **common)
    return CaseResult(name, str(dtype).removeprefix("torch."), True, **common)


def check_loss(fn, *, divergence: str = "reverse_kl", beta: float = 0.5, temperature: float = 1.0,
               reduction: str = "mean", dtypes=DEFAULT_DTYPES, device=None, cases=None, seed: int = 0,
               quick: bool = False, reference=None) -> LossReport:
    """Judge ``fn(student_logits, teacher_logits, mask) -> loss`` against wpkl's float64 reference.

    ``fn`` gets a [B, T, V] leaf ``student_logits`` (the dtype under test, on ``device``), ``teacher_logits``
    [B, T, V_t >= V] (only the first V columns count) and a bool ``mask`` [B, T], and returns the loss with
    ``divergence``, ``beta``, ``temperature`` (applied to both sides) and ``reduction``: "mean" over valid tokens,
    "sum", or "none" ([B, T], 0 where masked). ``divergence="sampled"`` also passes ``tokens=`` (the sampled
    tokens); the "temperature" case passes ``temperature=`` when ``fn`` takes it (else it is skipped).

    Each case (``cases``: names from ``wpkl.testing.CASE_NAMES``, or None for all) and dtype gives one
    ``CaseResult``: the value and the gradient against the reference computed in float64 from the same rounded
    inputs, judged by wpkl.testing.judge's rule; the gradient must be exactly 0 on masked tokens and in the logits'
    dtype and shape. A ``fn`` that raises or returns a non-finite loss or no gradient is a failed result.
    ``quick``: the long-rows case at V = 32771 instead of 151936, and no production-size case (N = 4096,
    V = 151936, bf16: by default on CUDA only; named on a CPU it is skipped). ``reference``: another float64-capable
    callable with ``fn``'s signature plus ``temperature=`` and ``tokens=`` (default: ``weighted_kl_loss`` on the
    reference backend with these options).
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    reference = reference or wpkl_reference(divergence, beta, reduction)
    report = LossReport()
    for index, case in enumerate(select(cases, device.type == "cuda", quick)):
        for dtype in dtypes:
            if case.dtypes is not None and str(dtype).removeprefix("torch.") not in case.dtypes:
                continue
            if case.cuda_only and device.type != "cuda":  # named on a CPU: its size is a GPU's
                report.results.append(CaseResult(case.name, str(dtype).removeprefix("torch."), True, skipped=True,
                                                 message="needs a CUDA device"))
                continue
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            batch = case.make(generator, quick)
            report.results.append(_one(fn, reference, batch, dtype, device, reduction, temperature, divergence,
                                       generator, case.name))
    return report


def assert_loss_correct(fn, **options) -> LossReport:
    """``check_loss`` that raises an ``AssertionError`` with the report's table when any result fails."""
    report = check_loss(fn, **options)
    if not report.passed:
        raise AssertionError(f"the loss does not match wpkl's float64 reference:\n{report}")
    return report
