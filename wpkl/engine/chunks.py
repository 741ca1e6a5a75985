"""The fused-linear form's chunks: how many tokens per chunk (from a memory budget), which tokens (valid ones
compacted; whole sequences when the weights need them), and the weights' gather context that backward re-enters.

Memory beyond the inputs and the returned gradients, per call (wpkl/engine/linear.py has the schedules):

    chunk buffers   chunk_size * (b V + 8 H) bytes      b = 16 with the Triton kernels (student and teacher logits
                                                        fp32, the logits-gradient, its cast to the compute dtype),
                                                        b = 48 with the torch pass (the reference math's
                                                        temporaries), 4 more per further teacher of
                                                        several teachers' pass (mixture.py); 8 H: the hidden rows
                                                        and their gradient
    accumulators    4 (V H + N H + V) bytes: grad_W, grad_h, grad_b in float32 (those that are asked for)
    casts           V H * bytes(compute dtype) per weight not already in the compute dtype (once per pass: the
                    two-phase schedule casts again in backward)

with ``chunk_size = max(1, CHUNK_BYTES // (b V + 8 H))`` tokens unless given (CHUNK_BYTES = 2 GiB: 871 tokens at
V = 151936, H = 4096 with the kernels; 3942 at V = 32000). Larger chunks amortize the float32 grad_W
read-modify-write every chunk makes (docs/design.md has the cost model). Valid tokens are compacted first: one
host sync (the chunk loop needs their count; with ``accumulated``, each sequence's too, in the same sync).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

CHUNK_BYTES = 2 << 30
# Bytes per logit of a chunk (module docstring): measured for the torch pass (peak RSS, tests/test_fused_linear.py).
BYTES_PER_LOGIT = {"triton": 16, "torch": 48}

# A factory of the context that makes the lm_head weights readable (DeepSpeed ZeRO-3's gather), set by
# ``gathered_weights``: the two-phase schedule re-enters it in backward, where it reads the weights again.
_weights_context: contextvars.ContextVar = contextvars.ContextVar("wpkl_weights_context", default=None)


@contextlib.contextmanager
def gathered_weights(factory):
    """Run fused-linear calls with ``factory()`` entered (e.g. TRL's ``maybe_gather_lm_head_ctx``); backward
    re-enters a fresh ``factory()`` when it recomputes the projections."""
    token = _weights_context.set(factory)
    try:
        with factory():
            yield
    finally:
        _weights_context.reset(token)


def weights_context():
    """The factory ``gathered_weights`` set for this call, or None."""
    return _weights_context.get()


def chunk_bytes(chunk_size: int, vocab: int, hidden: int, backend: str, teachers: int = 1) -> int:
    """The chunk buffers' bytes (module docstring); ``teachers`` > 1: several teachers' pass (mixture.py), whose
    further teachers' float32 logits add 4 bytes per logit each."""
    return chunk_size * ((BYTES_PER_LOGIT[backend] + 4 * (teachers - 1)) * vocab + 8 * hidden)


def chunk_size_for(vocab: int, hidden: int, backend: str, budget: int | None = None, teachers: int = 1) -> int:
    """Tokens per chunk from the memory budget (module docstring)."""
    return max(1, (CHUNK_BYTES if budget is None else budget) // chunk_bytes(1, vocab, hidden, backend, teachers))


def plan_chunks(valid: torch.Tensor, chunk_size: int, whole_rows: bool):
    """Chunks of the valid tokens of a [B, T] mask, as index tensors into the flattened [B * T] tokens.

    ``whole_rows``: every chunk holds whole sequences (rows); returns None when one sequence has more valid
    tokens than a chunk. One host sync (the valid tokens' count, and each row's, decide the loop).
    """
    B, T = valid.shape
    # The valid tokens first, in order (a stable sort: no data-dependent shape), then one transfer of the counts.
    order = torch.argsort((~valid).reshape(-1).to(torch.int8), stable=True)
    counts = valid.sum(dim=1)
    n_valid, *counts = torch.cat([counts.sum().reshape(1), counts]).tolist()  # the host sync
    ids = order[:n_valid]
    if not whole_rows:
        return [ids[i:i + chunk_size] for i in range(0, n_valid, chunk_size)]
    if max(counts, default=0) > chunk_size:
        return None
    chunks, start, size = [], 0, 0
    for count in counts:
        if size + count > chunk_size:
            chunks.append(ids[start:start + size])
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(ids[start:start + size])
    return chunks
