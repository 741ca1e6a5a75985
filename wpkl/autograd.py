"""Kernel launch builders, re-exported for the ahead-of-time resource report (``python -m wpkl.kernels.report``).

The Triton path's autograd lives in wpkl/ops.py (torch custom ops with registered autograd, traceable by
torch.compile) for materialized logits and in wpkl/fused_linear.py for hidden states; both launch the kernels
through wpkl/vocab_pass.py, which builds their grids and arguments.
"""

from __future__ import annotations

from .vocab_pass import KERNEL_DTYPES, backward_launch, divergence_id, forward_launch, weights_launch

__all__ = ["KERNEL_DTYPES", "backward_launch", "divergence_id", "forward_launch", "weights_launch"]
