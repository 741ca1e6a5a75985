"""wpkl's Triton kernels, ``wpkl.kernels``: the ``@triton.jit`` code in the repository's top-level kernels/ folder
(under the interpreter the helpers in common.py are plain functions, and exp2/log2 emulate the GPU's
approximations; see there).

kernels/ has no ``__init__.py`` on purpose: from the repository root (``python -m pytest``, ``python -m bench``)
it is then only a namespace portion, and an installed distribution of the same import name (Hugging Face's
``kernels``, which transformers requires) takes precedence over it. This module makes it wpkl's subpackage:
``__path__`` points at kernels/ in a checkout (or an editable install) and at wpkl/kernels/ in an installed wheel
(pyproject.toml maps the folder there). Nothing here imports Triton until a kernel is used.

Launch logic lives in wpkl/backends (triton_pass.py, triton_topk.py, triton_mixture.py, triton_sampled.py, weights_kernel.py), the autograd in
wpkl/engine and wpkl/backends/ops.py; the math they implement is specified by wpkl/reference.
"""

import os

_here = os.path.dirname(os.path.abspath(__file__))
_installed = os.path.join(_here, "kernels")
# A module with a __path__ is a package (the import system's definition): its submodules are the kernel files.
__path__ = [_installed if os.path.isdir(_installed) else os.path.join(os.path.dirname(_here), "kernels")]

_EXPORTS = {
    "DIVERGENCE_IDS": "common",
    "NUM_PUBLIC_STATS": "common",
    "NUM_STATS": "common",
    "token_divergence_bwd_kernel": "token_divergence_bwd",
    "token_divergence_fwd_kernel": "token_divergence_fwd",
    "token_jsd_partials_kernel": "token_divergence_fwd",
    "token_mixture_atoms_kernel": "token_mixture_bwd",
    "token_mixture_bwd_kernel": "token_mixture_bwd",
    "token_mixture_fwd_kernel": "token_mixture",
    "token_mixture_jsd_partials_kernel": "token_mixture",
    "topk_atoms_bwd_kernel": "token_topk",
    "NUM_CHECKS": "token_weights",
    "token_weights_kernel": "token_weights",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
