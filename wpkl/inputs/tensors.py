"""Checks of single input tensors: type, dtype, shape and device, each error naming the argument."""

from __future__ import annotations

import torch

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


def logits(name: str, x) -> torch.Tensor:
    x = float_tensor(name, x)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [B, T, V] or [N, V], got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: {tuple(x.shape)}")
    return x


def per_token(name: str, x, leading: torch.Size, device: torch.device, kinds: str, kind_text: str):
    """An optional per-token tensor of the leading shape and a dtype kind ('b' bool, 'i' int, 'f' float)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    kind = "b" if x.dtype == torch.bool else "f" if x.is_floating_point() else "c" if x.is_complex() else "i"
    if kind not in kinds:
        raise TypeError(f"{name} must be {kind_text} tensor, got {x.dtype}")
    if x.shape != leading:
        raise ValueError(f"{name} must have the logits' leading shape {tuple(leading)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    return x


def lm_head_weight(name: str, weight, hidden_size: int, hidden_name: str, device) -> torch.Tensor:
    weight = float_tensor(name, weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{name} must be an lm_head weight [V, H] with V > 0, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden_size:
        raise ValueError(f"{name} has hidden size {weight.shape[1]} but {hidden_name} has {hidden_size}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but {hidden_name} is on {device}")
    return weight


def lm_head_bias(name: str, bias, vocab: int, device) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = float_tensor(name, bias)
    if bias.shape != (vocab,):
        raise ValueError(f"{name} must have shape [{vocab}] (one per lm_head row), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{name} is on {bias.device} but the hidden states are on {device}")
    return bias


def topk_tensors(ids, logprobs, leading, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k teacher's ids (int64) and log-probabilities [*leading, K]."""
    for name, x, kind in (("teacher_topk_ids", ids, "i"), ("teacher_topk_logprobs", logprobs, "f")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        is_float = x.is_floating_point()
        if (kind == "f") != is_float or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be {'a floating-point' if kind == 'f' else 'an integer'} tensor, got {x.dtype}")
        if x.dim() != len(leading) + 1 or x.shape[:-1] != leading or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape {tuple(leading)} + (K,) with K >= 1, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} "
                         "must have the same shape")
    return ids.long(), logprobs
