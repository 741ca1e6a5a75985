"""Sequence layout of per-token vectors: one sequence per row, for the weights and reductions that need it.

[B, T, V] input is already laid out so (sequence b is row b). Packed [N, V] input with ``positions``
(the convention of Hugging Face's packed batches) is split into sequences at every position 0 and
scattered into a zero-padded [S, L] matrix; packed input without positions is one row.
"""

from __future__ import annotations

import torch


class SequenceLayout:
    def __init__(self, packed: bool, positions: torch.Tensor | None):
        self.index = None
        if not packed or positions is None or positions.numel() == 0:
            return
        pos = positions.reshape(-1)
        starts = pos == 0
        starts[0] = True
        seq = starts.long().cumsum(0) - 1
        start_index = starts.nonzero().squeeze(1)  # host sync: packed sequences only
        offset = torch.arange(pos.numel(), device=pos.device) - start_index[seq]
        self.index = (seq, offset)
        self.shape = (start_index.numel(), int(offset.max()) + 1)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] per-token tensor -> [S, L] with one sequence per row (padding is 0 / False)."""
        if self.index is None:
            return x
        return x.new_zeros(self.shape).index_put(self.index, x.reshape(-1))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rows``: [S, L] -> the [1, N] layout of the packed tokens."""
        if self.index is None:
            return x
        return x[self.index].unsqueeze(0)
