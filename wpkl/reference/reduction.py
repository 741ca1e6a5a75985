"""Reductions of the weighted per-token losses w_i * L_i (0 on masked tokens)."""

from __future__ import annotations

import torch


def reduce_loss(weighted: torch.Tensor, valid: torch.Tensor, reduction: str, num_items_in_batch=None) -> torch.Tensor:
    """Reduce [S, L] weighted losses laid out one sequence per row ("none" is handled by the caller).

    mean      sum_i w_i L_i / n_valid (or / num_items_in_batch), 0 with zero gradient when nothing is valid
              (whatever num_items_in_batch is then; validation rejects a count <= 0 when a token is valid)
    sum       sum_i w_i L_i
    seq_mean  mean over sequences with a valid token of (sum_t w_t L_t / the sequence's valid count)
    """
    if reduction == "sum":
        return weighted.sum()
    if reduction == "mean":
        if num_items_in_batch is None:
            return weighted.sum() / valid.sum().clamp_min(1)
        if isinstance(num_items_in_batch, torch.Tensor):
            count = num_items_in_batch.to(weighted.device, weighted.dtype).reshape(())
        else:  # a fill, not a host-to-device copy (which would wait for the GPU)
            count = weighted.new_full((), float(num_items_in_batch))
        # No valid token: 0 with a zero gradient, whatever the count (0 for an empty step's own count).
        return weighted.sum() / torch.where(valid.any(), count, 1.0)
    if reduction == "seq_mean":
        counts = valid.sum(dim=-1)
        per_sequence = weighted.sum(dim=-1) / counts.clamp_min(1)
        return per_sequence.sum() / (counts > 0).sum().clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")
