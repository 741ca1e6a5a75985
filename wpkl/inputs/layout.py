"""Sequence layout of per-token vectors: one sequence per row, for the weights and reductions that need it.

[B, T, V] input is already laid out so (sequence b is row b). Packed [N, V] input with ``positions``
(the convention of Hugging Face's packed batches) is split into sequences at every position 0 and
scattered into a zero-padded [S, L] matrix; packed input without positions is one row.

With ``sequence_ids`` (``SequenceLayout.by_ids``) the ids say which sequence each token belongs to and the
positions where it sits: token i goes to row ``sequence_ids[i]``, column ``positions[i]`` minus the smallest
position of its sequence, whatever the order of the tokens (a batch gathered from the ranks of a sequence
group, or a packed batch whose positions do not restart at 0). Every token claims its place, masked or not:
two tokens in one place, or a place left empty inside a sequence, is an error (``checks``). The layout has one
row per id up to the largest: ids are meant dense (0 .. S - 1), not sparse sample uids.

The weights' positions are then counted among the valid tokens of each sequence in position order (as without
``positions``): ``positions`` place the tokens, so a prompt before the response counts as it does on one device.
"""

from __future__ import annotations

import torch


class SequenceLayout:
    def __init__(self, packed: bool, positions: torch.Tensor | None):
        self.index = None
        self.checks = []
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

    @classmethod
    def by_ids(cls, sequence_ids: torch.Tensor, positions: torch.Tensor) -> SequenceLayout:
        """The layout of tokens with ``sequence_ids`` (int >= 0) at ``positions`` (module docstring; its bounds
        read from the data: a host sync). ``checks``: ``place_checks``'s, for wpkl/inputs/checks.py."""
        self = cls(False, None)
        # a negative id (an error the value checks report, later on CUDA) must not index from the end meanwhile
        ids, pos = sequence_ids.reshape(-1).long().clamp_min(0), positions.reshape(-1).long()
        n, device = ids.numel(), ids.device
        if n == 0:
            self.index = (ids, pos)
            self.shape = (0, 0)
            return self
        rows = int(ids.max()) + 1  # host sync
        first = torch.full((rows,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
        first = first.scatter_reduce(0, ids, pos, "amin")
        column = pos - first[ids]
        self.shape = (rows, int(column.max()) + 1)  # host sync
        self.index = (ids, column)
        count = torch.zeros(self.shape, dtype=torch.int32, device=device).index_put(
            self.index, torch.ones_like(ids, dtype=torch.int32), accumulate=True)
        self.checks = place_checks(count)
        return self

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] per-token tensor -> [S, L] with one sequence per row (padding is 0 / False)."""
        if self.index is None:
            return x
        return x.new_zeros(self.shape).index_put(self.index, x.reshape(-1))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rows``: [S, L] -> the [1, N] layout of the tokens."""
        if self.index is None:
            return x
        return x[self.index].unsqueeze(0)


def place_checks(count: torch.Tensor, what: str = "tokens") -> list[tuple[str, torch.Tensor]]:
    """The checks of a layout from how many tokens claim each place ([S, L]): (message, bad-flag tensor) pairs
    for wpkl/inputs/checks.py. Two tokens in one place, or a place left empty between a sequence's first and last
    token, is an error."""
    occupied, column = count > 0, torch.arange(count.shape[1], device=count.device)
    first = torch.where(occupied, column, count.shape[1]).amin(1, keepdim=True)
    last = torch.where(occupied, column, -1).amax(1, keepdim=True)
    return [
        (f"sequence_ids and positions: two {what} claim the same (sequence, position); every token, masked or not, "
         "has its own place (give padding its own positions or its own sequence id)", count > 1),
        (f"sequence_ids and positions: a sequence's positions have a gap (no {what} at a position between its first "
         "and its last): every token of a sequence must be passed, masked or not",
         (column >= first) & (column <= last) & ~occupied),
    ]
