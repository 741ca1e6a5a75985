"""wpkl's Triton kernels (installed as ``wpkl.kernels``): ``@triton.jit`` code only (under the interpreter the
helpers in common.py are plain functions, and exp2/log2 emulate the GPU's approximations; see there).

Launch logic lives in ``wpkl/vocab_pass.py``, the autograd in ``wpkl/ops.py`` and ``wpkl/fused_linear.py``; the
math they implement is specified by ``wpkl/reference.py``.
"""

from .common import DIVERGENCE_IDS, NUM_PUBLIC_STATS, NUM_STATS
from .token_divergence_bwd import token_divergence_bwd_kernel
from .token_divergence_fwd import token_divergence_fwd_kernel
from .token_topk import topk_atoms_bwd_kernel
from .token_weights import NUM_CHECKS, token_weights_kernel

__all__ = [
    "DIVERGENCE_IDS",
    "NUM_PUBLIC_STATS",
    "NUM_STATS",
    "token_divergence_bwd_kernel",
    "token_divergence_fwd_kernel",
    "token_weights_kernel",
    "topk_atoms_bwd_kernel",
    "NUM_CHECKS",
]
