"""What every kernel launch shares: the kernels module (imported on first use), the launch itself, and output
allocation in one place (tests swap in NaN-filled buffers to prove the kernels write every element)."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634  # the kernels work in base 2: t = x * log2(e) / T

new_buffer = torch.empty
new_buffer_like = torch.empty_like


def kernels():
    """wpkl.kernels, imported on first use: importing wpkl must neither need Triton nor compile anything."""
    from .. import kernels as module

    return module


def launch(kernel, grid, args, meta) -> None:
    """Launch a kernel. Under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) numpy evaluates masked-off
    lanes too (-inf - -inf, exp overflow) and would warn about values the kernel then discards: those warnings
    are silenced here, for wpkl's own launches only."""
    if type(kernel).__name__ == "InterpretedFunction":
        import warnings

        import numpy as np

        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's "All-NaN slice" in masked-off reductions
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def divergence_id(divergence: str) -> int:
    """The kernels' id of an exact divergence (``LossSpec.exact_divergence``)."""
    return kernels().DIVERGENCE_IDS[divergence]


DIVERGENCE_JSD = 2  # kernels.DIVERGENCE_IDS["jsd"], without importing Triton


def num_stats() -> int:
    return kernels().NUM_STATS
