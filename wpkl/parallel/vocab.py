"""Vocabulary parallelism (Megatron's tensor-parallel lm_head): the loss from vocabulary shards, never gathering
[N, V].

Rank r of a group of R ranks holds the contiguous vocabulary slice ``[r * V_local, (r + 1) * V_local)`` of the
student's logits (or lm_head rows) and of the teacher's: equal shards, the whole vocabulary ``V = R * V_local``.
Token ids (``tokens``, ``teacher_topk_ids``) are global. Every rank gets the same loss, the same TokenStats and
the same weights; the gradient of the student logits (lm_head weight, bias) is the rank's slice of the
full-vocabulary gradient, and the hidden states' gradient (fused-linear form) is the full one, summed over the
group here.

How (docs/design.md has the collectives and bytes per call):

- the torch pass: the per-token math of wpkl/reference runs on each rank's slice with a ``VocabShard``
  (below) combining its per-row vocabulary sums and maxima over the group (all-reduces of [rows]-sized
  tensors). Gradients follow Megatron's conjugate operators: ``sum`` (forward all-reduce, backward identity:
  every rank computes the same loss from the sum) and ``copy`` (forward identity, backward all-reduce: where
  the summed log-normalizer enters the slice's own log-probabilities), so autograd gives each rank its slice's
  gradient.
- the Triton kernels (wpkl/parallel/merge.py: ``ShardedTritonPass``): the forward kernel on the slice, its
  per-token statistics merged over the group (``merge_kernel_stats``: two all-reduces), the unchanged backward kernel on the slice with the
  merged statistics (no collective in backward); a top-k teacher (wpkl/parallel/shard_topk.py): the student's
  statistics merged, the atoms' logits gathered from the ranks that hold them (one all-reduce of [N, K]), and
  the fix-up of the atoms this rank holds; jsd: the normalizers merged first, then its second pass on the slice
  with them, and one all-reduce of that pass's four sums [4, N].

Weighting and reduction then run on the combined per-token terms, in torch, identically on every rank.

Before any of these, one all-gather of a few integers per rank (wpkl/parallel/agree.py) checks that the ranks
agree on the shapes and options, and that none rejected its inputs: a bad input raises on every rank, never leaving the
others waiting in a collective.
"""

from __future__ import annotations

import torch


def _dist():
    import torch.distributed as dist

    return dist


class _AllReduceSum(torch.autograd.Function):
    """The sum over the group; backward: the identity (every rank computes the same loss from the sum)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.contiguous().clone()
        _dist().all_reduce(y, op=_dist().ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """The identity; backward: the gradient summed over the group (a value every rank holds, used by per-rank
    work: each rank's part of its gradient is added up)."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shard = ctx.shard
        shard._count(grad)
        grad = grad.contiguous().clone()
        _dist().all_reduce(grad, op=_dist().ReduceOp.SUM, group=shard.group)
        return grad, None


class VocabShard:
    """This rank's slice of a vocabulary split evenly over ``group``: what wpkl/reference's per-row vocabulary
    sums and maxima need to become the whole vocabulary's. Counts its collectives (``calls``, ``bytes``: the
    bytes each rank contributes) for tests and docs."""

    def __init__(self, group, size: int):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.size = size  # V_local
        self.offset = self.rank * size
        self.vocab = self.world * size
        self.calls = 0
        self.bytes = 0

    def _count(self, x: torch.Tensor) -> None:
        self.calls += 1
        self.bytes += x.numel() * x.element_size()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        return _AllReduceSum.apply(x, self.group)

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        return _CopyToGroup.apply(x, self)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        y = x.detach().contiguous().clone()
        _dist().all_reduce(y, op=_dist().ReduceOp.MAX, group=self.group)
        return y

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """In place, no autograd: the fused-linear form's hidden-state gradient."""
        self._count(x)
        _dist().all_reduce(x, op=_dist().ReduceOp.SUM, group=self.group)
        return x

    def __repr__(self) -> str:
        return f"VocabShard(rank={self.rank}, world={self.world}, size={self.size})"


def local_tokens(tokens: torch.Tensor | None, shard: VocabShard) -> torch.Tensor | None:
    """Global token ids as this rank's column indices, -1 where another rank holds the token (the backward
    kernel's one-hot then never fires, and the forward kernel reads nothing there)."""
    if tokens is None:
        return None
    local = tokens - shard.offset
    return torch.where((local >= 0) & (local < shard.size), local, -1)


def owned_logit(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Raw logits x[..., local] in float64 (x: [..., V], local: its leading shape), 0 where local = -1."""
    value = x.gather(-1, local.clamp_min(0).unsqueeze(-1)).squeeze(-1).double()
    return torch.where(local >= 0, value, 0.0)


