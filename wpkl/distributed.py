"""Data parallelism (DDP): the one all-reduce that makes each rank's loss its share of the global batch's loss.

Every weight factor of ``wpkl.Weighting`` but ``normalize=True`` is per token (``confidence``,
``disagreement``, ``token_weights``) or per sequence (``position``, ``accumulated``, ``prefix_confidence``: they
read only the sequence's own tokens), so it is the same whichever rank or micro-batch holds the sequence, as long
as a sequence is not split across calls. What is per call (one rank's micro-batch) is:

- ``normalize=True``: weights rescaled to mean 1 over the valid tokens *of the call*;
- ``reduction="mean"``: divided by the call's valid-token count, unless ``num_items_in_batch`` is given;
- ``reduction="seq_mean"``: divided by the number of the call's sequences that have a valid token.

The global versions need one all-reduce of a scalar each (no host sync, no change to the loss call):

    num_items = global_count(mask)                        # "mean": num_items_in_batch=num_items, loss * world
    loss_sum, stats = weighted_kl_loss(..., weighting=replace(w, normalize=False), reduction="sum",
                                       return_stats=True)
    loss = loss_sum / global_weight_sum(stats.weight)     # normalize=True over the global batch ("mean"); * world

DDP averages the ranks' gradients (divides their sum by the world size), so a loss divided by a *global*
denominator is multiplied by the world size before ``backward`` (what Hugging Face ``Trainer.compute_loss``
does with ``average_tokens_across_devices``; TRL's ``DistillationTrainer`` divides the count by the world size
instead: the same gradient). See docs/recipes.md, "Data parallel", and examples/ddp_distill.py.

A sequence split across ranks (context or sequence parallelism) is the other case: pass ``sequence_group=`` to
the loss, with each token's ``positions`` and ``sequence_ids`` (``megatron_bshd``, ``megatron_thd`` and
``contiguous`` give them for the trainers' layouts); the weights and the reduction are then the whole batch's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Sequence parallelism (``sequence_group=``): where each token goes under the trainers' layouts (pure functions).
from .parallel.layouts import LocalTokens, contiguous, megatron_bshd, megatron_thd


def global_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """``value`` summed over the ranks of ``group`` (default: the world): a new tensor, one all-reduce.

    ``value`` must be on a device the backend communicates on (CUDA for NCCL, CPU for gloo); it is not modified
    and gets no gradient (the sum is a constant for autograd).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"global_sum takes a tensor, got {type(value).__name__}")
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def global_count(local: torch.Tensor, group=None) -> torch.Tensor:
    """The valid-token count of the global batch: ``num_items_in_batch`` for ``reduction="mean"`` under DDP.

    ``local``: this rank's bool mask (its True entries are counted) or its count (an integer or float tensor,
    e.g. ``sum(m.sum() for m in micro_batch_masks)`` under gradient accumulation). One all-reduce of a scalar.
    """
    if not isinstance(local, torch.Tensor):
        raise TypeError(f"global_count takes a bool mask or a count tensor, got {type(local).__name__}")
    count = local.sum() if local.dtype == torch.bool else local
    if count.numel() != 1:
        raise ValueError(f"global_count takes a bool mask or a scalar count, got shape {tuple(local.shape)}")
    return global_sum(count.reshape(()), group)


def global_weight_sum(weights: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of the raw (``normalize=False``) weights over every rank: the denominator of global normalization.

    ``weights``: this rank's ``stats.weight`` (any shape, 0 on masked tokens), or its sum over the rank's
    micro-batches. ``loss_sum / global_weight_sum(...)``, with ``loss_sum`` the ``reduction="sum"`` loss of the
    same weighting with ``normalize=False``, is the ``reduction="mean"`` loss that ``normalize=True`` gives on the
    whole global batch in one process (weights rescaled to mean 1 over all its valid tokens, then divided by
    that count: the count cancels). Returns 1 where every weight is 0 (the loss is then 0, as with
    ``normalize=True``). One all-reduce of a scalar.
    """
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError("global_weight_sum takes a float tensor of weights (stats.weight)")
    total = global_sum(weights.sum().reshape(()), group)
    return torch.where(total > 0, total, torch.ones_like(total))

__all__ = ["global_sum", "global_count", "global_weight_sum", "LocalTokens", "megatron_bshd", "megatron_thd",
           "contiguous"]
