"""The fused-linear suite (``python -m bench --suite linear``): the loss from hidden states and lm_head weights.

    wpkl        wpkl.fused_linear_kl_loss (Triton kernels on a GPU, the torch pass on a CPU)
    trl         TRL 1.16's DistillationTrainer divergence (trl/trainer/distillation_trainer.py,
                _chunked_divergence_loss), beta = 1 (reverse KL)
    liger       Liger-Kernel's LigerFusedLinearJSD(jsd_beta=1) (reverse KL; CUDA only; no weighting)
    eager       materialized: both logits projected in full, then log_softmax, KL, weights, masked mean
    gemms       the bare GEMMs wpkl's eager schedule performs (two projections with float32 output, two gradient
                GEMMs), in chunks of 4096 tokens: the floor the fused path's time is compared with

Reverse KL, every token valid, fwd+bwd (gradients for the student's hidden states and lm_head weight).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import wpkl

from .cases import CASES, Case
from .providers import eager_loss
from .results import Row

PROVIDERS = ("wpkl", "trl", "liger", "eager", "gemms")
LINEAR_CASES = ("uniform", "combined")


@dataclass(frozen=True)
class LinearShape:
    tokens: int
    hidden: int
    vocab: int
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        return f"N={self.tokens} H={self.hidden} V={self.vocab} {self.dtype}"


SHAPES = {
    "cuda": [LinearShape(n, 4096, v) for n in (4096, 16384) for v in (128256, 151936)],
    "cpu": [LinearShape(1024, 256, 8192, "float32")],
}


def parse_linear_shape(text: str) -> LinearShape:
    """'4096x4096x128256' or '1024x256x8192:float32' (N x H x V)."""
    dims, _, dtype = text.partition(":")
    n, h, v = (int(x) for x in dims.lower().split("x"))
    return LinearShape(n, h, v, dtype or "bfloat16")


@dataclass
class LinearInputs:
    student_hidden: torch.Tensor  # [B, T, H], requires grad
    student_weight: torch.Tensor  # [V, H], requires grad
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    mask: torch.Tensor  # [B, T] bool, all True


def make_inputs(shape: LinearShape, device: str, seed: int = 0) -> LinearInputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    T = min(shape.tokens, 1024)
    B = shape.tokens // T
    dtype = getattr(torch, shape.dtype)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    scale = 2.0 / shape.hidden**0.5  # logits of order 2, like a trained lm_head
    return LinearInputs(rand(B, T, shape.hidden).requires_grad_(True),
                        rand(shape.vocab, shape.hidden, scale=scale).requires_grad_(True),
                        rand(B, T, shape.hidden), rand(shape.vocab, shape.hidden, scale=scale),
                        torch.ones(B, T, dtype=torch.bool, device=device))


def unavailable(provider: str, case: Case, device: str) -> str | None:
    if provider == "trl":
        if importlib.util.find_spec("trl") is None:
            return "trl is not installed"
        if case.name != "uniform":
            return "TRL's chunked divergence has no token weighting"
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if device != "cuda":
            return "Liger-Kernel needs a CUDA GPU"
        if case.name != "uniform":
            return "Liger-Kernel has no weighted loss"
    if provider == "gemms" and case.name != "uniform":
        return "the same GEMMs as the uniform case"
    return None


def build(provider: str, case: Case, x: LinearInputs):
    """A zero-argument function computing the case's loss (a scalar to backpropagate)."""
    hs, ws, ht, wt, mask = x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, x.mask
    if provider == "wpkl":
        return lambda: wpkl.fused_linear_kl_loss(hs, ws, ht, wt, mask=mask, weighting=case.weighting)
    if provider == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        return lambda: _chunked_divergence_loss(hs, ht, ws, wt, mask.long(), beta=1.0)[0]
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=1.0)
        H = hs.shape[-1]
        return lambda: jsd(hs.reshape(-1, H), ws, ht.reshape(-1, H), wt)
    if provider == "eager":
        def materialized():
            student = hs @ ws.T
            with torch.no_grad():
                teacher = ht @ wt.T
            return eager_loss(student, teacher, mask, None, case.name)

        return materialized
    if provider == "gemms":
        return _gemms(x)
    raise ValueError(f"unknown provider {provider!r}")


class _GemmsOnly(torch.autograd.Function):
    """The GEMMs of wpkl's eager schedule, chunk by chunk, with nothing between them."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, chunk):
        from wpkl.backends.projection import addmm_fp32, matmul_fp32

        N, V = hs.shape[0], ws.shape[0]
        grad_h = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device)
        for start in range(0, N, chunk):
            h = hs[start:start + chunk]
            s = matmul_fp32(h, ws.t())
            matmul_fp32(ht[start:start + chunk], wt.t())
            g = s.to(hs.dtype)
            grad_h[start:start + chunk] = matmul_fp32(g, ws)
            addmm_fp32(grad_w, g.t(), h)
        ctx.grads = grad_h, grad_w
        return hs.new_zeros((), dtype=torch.float32) + V * 0.0

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.grads
        return grad_h, grad_w, None, None, None


# The floor's token chunk: large, so that the float32 grad_W read-modify-write per chunk is amortized and the GEMMs
# run near full efficiency (docs/design.md: the cost model of the fused-linear form).
GEMM_CHUNK = 4096


def _gemms(x: LinearInputs):
    H = x.student_hidden.shape[-1]
    hs, ht = x.student_hidden.reshape(-1, H), x.teacher_hidden.reshape(-1, H)
    return lambda: _GemmsOnly.apply(hs, x.student_weight, ht, x.teacher_weight, min(hs.shape[0], GEMM_CHUNK))


def gemm_flops(shape: LinearShape) -> float:
    """Four GEMM-equivalents of N * V * H multiply-adds (the eager schedule)."""
    return 4 * 2.0 * shape.tokens * shape.vocab * shape.hidden


def rows_for(shape: LinearShape, device: str, providers, budget_left, measure_fn) -> list[Row]:
    """Measure every (case, provider) at one shape; ``measure_fn(fn, grads) -> (ms, p20, p80, peak bytes)``."""
    out = []
    try:
        inputs = make_inputs(shape, device)
    except Exception as error:  # noqa: BLE001 - an input that does not fit is a result
        return [Row(p, f"linear-{c}", shape.tokens, shape.vocab, shape.dtype, "fwd+bwd", "skipped",
                    hidden=shape.hidden, note=f"inputs do not fit: {type(error).__name__}")
                for c in LINEAR_CASES for p in providers]
    for case_name in LINEAR_CASES:
        case = CASES[case_name]
        for provider in providers:
            row = Row(provider, f"linear-{case_name}", shape.tokens, shape.vocab, shape.dtype, "fwd+bwd", "ok",
                      hidden=shape.hidden)
            reason = unavailable(provider, case, device) or budget_left()
            if reason:
                row.status, row.note = "skipped", reason
                out.append(row)
                continue
            grads = [inputs.student_hidden, inputs.student_weight]
            try:
                fn = build(provider, case, inputs)
                with torch.no_grad():
                    row.note = f"loss {float(fn()):.6g}" if provider != "gemms" else "GEMMs only"
                row.ms, row.ms_p20, row.ms_p80, peak = measure_fn(lambda fn=fn: fn().backward(), grads)
                row.peak_extra_mib = None if peak is None else peak / 2**20
                row.tflops = gemm_flops(shape) / (row.ms * 1e-3) / 1e12
            except Exception as error:  # noqa: BLE001
                oom = isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)
                row.status = "oom" if oom else "error"
                row.note = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            finally:
                for t in grads:
                    t.grad = None
                if device == "cuda":
                    torch.cuda.empty_cache()
            out.append(row)
    return out
