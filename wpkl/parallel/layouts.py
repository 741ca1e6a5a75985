"""Where each token of a batch goes under the sequence-parallel layouts trainers use: pure functions, no
communication. Each returns a ``LocalTokens``: rank r's tokens in its local order, as indices into the whole
batch (flattened) with their positions and sequence ids, the inputs a ``sequence_group`` call needs
(wpkl/parallel/sequence.py). A trainer slices its whole-batch tensors with ``index`` (or, having its own
sharded tensors already, passes only ``positions`` and ``sequence_ids``).

- ``megatron_bshd``: Megatron-LM context parallelism on padded [B, T] batches. Each sequence is cut into 2 * cp
  equal chunks; rank r holds chunks r and 2 * cp - 1 - r (load balancing for causal attention), so its local
  batch is [B, 2 * T / (2 * cp)].
- ``megatron_thd``: the same per sequence of a packed (THD) batch with ``cu_seqlens``: each sequence is padded
  to a multiple of 2 * cp (Transformer Engine's ``cu_seqlens_padded``) and cut on its own; rank r's local stream
  is its two chunks of every sequence, in order.
- ``contiguous``: DeepSpeed-Ulysses and verl's sequence parallelism: the packed stream (padding removed) padded
  at its end to a multiple of sp and sliced into sp equal contiguous parts.

The helpers return CPU tensors (move them to the batch's device). A padding token (one the layouts add) has
``index`` -1 and ``valid`` False: give it any logits and mask it. It
holds a place of its own (the sequence it pads, or for ``contiguous`` an extra sequence of padding, id S), so
that every place is claimed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LocalTokens:
    """Rank r's tokens: ``index`` into the flattened whole batch (-1: padding the layout adds), ``positions`` and
    ``sequence_ids`` (int64, the local leading shape), ``valid`` = index >= 0, and ``bounds``: the whole batch's
    (number of sequences, longest padded sequence), every rank's the same: pass it as ``sequence_bounds`` and the
    call makes no host sync (wpkl/parallel/sequence.py)."""

    index: torch.Tensor
    positions: torch.Tensor
    sequence_ids: torch.Tensor
    batch_dims: int = 1  # the whole batch's leading dimensions: 2 for [B, T], 1 for a packed [N]
    bounds: tuple[int, int] | None = None  # (the helpers below always give it)

    @property
    def valid(self) -> torch.Tensor:
        return self.index >= 0

    def take(self, whole: torch.Tensor, fill=0) -> torch.Tensor:
        """The rank's slice of a whole-batch tensor (leading shape [B, T] or [N]; ``fill`` at padding)."""
        flat = whole.reshape(-1, *whole.shape[self.batch_dims:])
        out = flat[self.index.clamp_min(0).reshape(-1)]
        pad = (~self.valid).reshape(-1, *([1] * (out.dim() - 1)))
        out = torch.where(pad, torch.as_tensor(fill, dtype=out.dtype, device=out.device), out)
        return out.reshape(*self.index.shape, *out.shape[1:])


def _check(name: str, size: int, rank: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive int, got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ValueError(f"rank must be an int in [0, {size}), got {rank!r}")


def _chunk_pair(length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of rank ``rank``'s two chunks of a sequence of (padded) ``length``: chunks r and 2cp-1-r."""
    chunk = length // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def megatron_bshd(batch: int, seq_len: int, cp_size: int, rank: int) -> LocalTokens:
    """Megatron's load-balanced context-parallel split of a padded [batch, seq_len] batch (seq_len a multiple of
    2 * cp_size): local leading shape [batch, seq_len // cp_size]."""
    _check("cp_size", cp_size, rank)
    if seq_len % (2 * cp_size):
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of 2 * cp_size ({2 * cp_size}): pad the batch")
    pos = _chunk_pair(seq_len, cp_size, rank).expand(batch, -1)
    ids = torch.arange(batch).unsqueeze(1).expand_as(pos)
    return LocalTokens(ids * seq_len + pos, pos.clone(), ids.clone(), batch_dims=2,
                       bounds=(max(batch, 1), seq_len))


def _lengths(cu_seqlens) -> list[int]:
    cu = torch.as_tensor(cu_seqlens).reshape(-1).tolist()
    if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must start at 0 and not decrease, got {cu}")
    return [b - a for a, b in zip(cu, cu[1:], strict=False)]


def megatron_thd(cu_seqlens, cp_size: int, rank: int, pad_multiple: int | None = None) -> LocalTokens:
    """Megatron's context-parallel split of a packed batch with ``cu_seqlens`` ([S + 1], the unpadded
    boundaries): each sequence padded to a multiple of ``pad_multiple`` (default 2 * cp_size; verl and
    Megatron-Bridge pad to tp * cp * 2 with tensor parallelism: pass that) and cut on its own."""
    _check("cp_size", cp_size, rank)
    multiple = 2 * cp_size if pad_multiple is None else pad_multiple
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1 or multiple % (2 * cp_size):
        raise ValueError(f"pad_multiple must be a positive multiple of 2 * cp_size ({2 * cp_size}), got {multiple!r}")
    lengths, start = _lengths(cu_seqlens), 0
    index, positions, ids, longest = [], [], [], 1
    for s, length in enumerate(lengths):
        padded = -(-length // multiple) * multiple
        longest = max(longest, padded)
        pos = _chunk_pair(padded, cp_size, rank)
        index.append(torch.where(pos < length, start + pos, -1))
        positions.append(pos)
        ids.append(torch.full_like(pos, s))
        start += length
    empty = torch.zeros(0, dtype=torch.int64)
    return LocalTokens(*(torch.cat(x) if x else empty for x in (index, positions, ids)),
                       bounds=(max(len(lengths), 1), longest))


def contiguous(cu_seqlens, sp_size: int, rank: int) -> LocalTokens:
    """Ulysses / verl: the packed stream of ``cu_seqlens`` padded at its end to a multiple of sp_size, sliced
    into equal contiguous parts; rank r's part."""
    _check("sp_size", sp_size, rank)
    lengths = _lengths(cu_seqlens)
    total = sum(lengths)
    padded = -(-total // sp_size) * sp_size
    part = padded // sp_size
    flat = torch.arange(rank * part, (rank + 1) * part)
    ids_of = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))
    starts = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)[:-1]
    real = flat < total
    safe = flat.clamp_max(max(total - 1, 0))
    ids = torch.where(real, ids_of[safe] if total else 0, len(lengths))
    positions = torch.where(real, flat - (starts[ids_of[safe]] if total else 0), flat - total)
    # (the padding at the end is an extra sequence, id S, of padded - total tokens)
    return LocalTokens(torch.where(real, flat, -1), positions, ids,
                       bounds=(len(lengths) + 1, max(max(lengths, default=0), padded - total, 1)))
