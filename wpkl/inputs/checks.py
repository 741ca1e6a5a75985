"""Value checks that need the data (a token out of range, a negative weight, a probability given as a log-prob)
without a host synchronization on the GPU.

On the CPU a check is a plain comparison: it raises at once. On a CUDA device, reading a flag back would stall
the host until the GPU catches up (and forbid CUDA graphs), so the flags are copied to pinned host memory
asynchronously; a later wpkl call raises the error as soon as the copy has landed (``torch.cuda.Event.query``,
no waiting), and ``wpkl.check_errors()`` waits for every pending check and raises. The kernels never read out of
bounds on bad input meanwhile: an out-of-range token gives a NaN loss for its row.
"""

from __future__ import annotations

import contextlib

import torch

_pending: list[tuple[torch.cuda.Event, torch.Tensor, list[str]]] = []


class DeferredCheckError(ValueError):
    """A ValueError found by a check that ran on the GPU without a host sync, raised by a later wpkl call or by
    ``wpkl.check_errors()``."""


def run_checks(checks: list[tuple[str, torch.Tensor]], raise_earlier: bool = True) -> torch.Tensor | None:
    """``checks``: (message, a bool tensor that is True where the input is bad). Raises now on the CPU; on CUDA
    queues the flags and raises the first failure of an earlier call whose flags have arrived (unless
    ``raise_earlier=False``: a check made after a collective, where one rank raising alone would leave the
    others with a loss; the earlier failure then surfaces at the next call's agreement, on every rank).
    Returns the flags (one per check; None without checks): a deferred failure can travel in an agreement."""
    if not checks:
        if raise_earlier:
            raise_arrived()
        return None
    flags = torch.stack([bad.any() for _, bad in checks])
    run_flags(flags, [message for message, _ in checks], raise_earlier)
    return flags


def run_flags(flags: torch.Tensor, messages: list[str], raise_earlier: bool = True) -> None:
    """Flags a kernel wrote (nonzero = that check failed): raised now on the CPU, deferred on CUDA."""
    if raise_earlier:
        raise_arrived()
    if not _deferred(flags):
        for message, failed in zip(messages, flags.tolist(), strict=True):
            if failed:
                raise ValueError(message)
        return
    _queue(flags, messages)


def _deferred(flags: torch.Tensor) -> bool:
    """Whether reading these flags would stall the host (a CUDA device): then they are read later."""
    return flags.device.type == "cuda"


def _queue(flags: torch.Tensor, messages: list[str]) -> None:
    host = _pinned(flags.shape, flags.dtype)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, host, messages))


_free_pinned: list[torch.Tensor] = []


def _pinned(shape, dtype) -> torch.Tensor:
    """A pinned host buffer, reused once its check has been read (pinning memory is slow: not per call)."""
    for i, buffer in enumerate(_free_pinned):
        if buffer.shape == shape and buffer.dtype == dtype:
            return _free_pinned.pop(i)
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _raise_from(entries, hold: bool = False) -> list:
    """Raise the first failure of ``entries`` (their flags have arrived in host memory: reading them waits for
    nothing); the entries after it go back to the front of the pending ones (raised by the next look: none is
    lost). ``hold``: return the failed entries instead, still pending (the others' buffers are freed)."""
    held = []
    for i, entry in enumerate(entries):
        _, host, messages = entry
        values = host.tolist()
        if hold:
            if any(values):
                held.append(entry)
            else:
                _free_pinned.append(host)
            continue
        _free_pinned.append(host)
        for message, failed in zip(messages, values, strict=True):
            if failed:
                _pending[:0] = entries[i + 1:]
                raise DeferredCheckError(
                    f"{message} (found by a check on the GPU that does not stall the host: raised by a later wpkl "
                    "call or by wpkl.check_errors(); the loss of the call that received this input is not valid)")
    return held


_holding = [0]


@contextlib.contextmanager
def holding_earlier():
    """Within: an earlier call's failed checks are not raised (they stay pending for ``check_errors()`` or a
    later call outside). A sequence-parallel call without a host read (``sequence_bounds``) holds them: each
    rank's flags arrive at its own time, and a rank raising alone mid-call would leave its peers with a loss."""
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1


def raise_arrived() -> None:
    """Raise the first failure among pending checks whose flags have arrived; never waits. While holding
    (``holding_earlier``) the failures stay pending and only the passed checks' buffers are freed."""
    arrived = []
    while _pending and _pending[0][0].query():
        arrived.append(_pending.pop(0))
    if _holding[0]:
        _pending[:0] = _raise_from(arrived, hold=True)
        return
    _raise_from(arrived)


def check_errors() -> None:
    """Wait for every pending value check of earlier wpkl calls and raise the first failure, if any."""
    entries = list(_pending)
    _pending.clear()
    for event, _, _ in entries:
        event.synchronize()
    _raise_from(entries)
