"""The lm_head projection: hidden states to float32 logits, exactly as TRL's DistillationTrainer computes them.

    logits = softcap(scale * (hidden @ weight.T + bias)),   softcap(x) = c * tanh(x / c)   (scale, then softcap)

Precision (TRL 1.16's convention, ``trl/kernels/chunked_divergence.py: _project``): the weight is cast to the
*compute dtype* (the autocast dtype when autocast is on, else the hidden states' dtype), the product is
accumulated and returned in float32 (never rounded to bf16), and the bias is added in float32. So bf16 hidden
states with an fp32 lm_head weight multiply bf16 x bf16 with fp32 output, as TRL does; fp32 hidden states
multiply in fp32.
"""

from __future__ import annotations

import sys

import torch

# torch.mm(..., out_dtype=torch.float32) from bf16/fp16 inputs: CUDA, torch >= 2.8.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def projection_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the product runs in: autocast's when it is on for the hidden states' device, else theirs."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def gather_full(weight: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 DTensor lm_head weight or bias, gathered once (as TRL does); other tensors unchanged."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # loaded by whoever made a DTensor
    if weight is not None and dtensor is not None and isinstance(weight, dtensor.DTensor):
        return weight.full_tensor()
    return weight


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Products accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32 (float64 for float64 inputs), never rounded to a half dtype."""
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    acc = accumulate_dtype(a.dtype)
    return torch.mm(a.to(acc), b.to(acc))


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 (or float64) accumulator, without rounding a @ b to the inputs' dtype first."""
    if _MM_OUT_DTYPE and acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def project(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """float32 logits ``softcap(scale * (hidden @ weight.T + bias))`` for hidden [..., H] and weight [V, H]
    (float64 when the compute dtype is float64)."""
    dtype = projection_dtype(hidden) if dtype is None else dtype
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    logits = matmul_fp32(flat, weight.to(dtype).t())
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.reshape(*hidden.shape[:-1], weight.shape[0])
