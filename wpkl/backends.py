"""Backend dispatch: which implementation computes the per-token terms over the vocabulary.

    triton     the fused kernels (wpkl/autograd.py): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    torch      the chunked pure-torch path (wpkl/torch_path.py): any device, bounded memory
    reference  the specification (wpkl/reference.py) on all valid rows at once: float64-capable, for tests
    auto       triton for CUDA tensors in float32/bfloat16/float16 when Triton is installed, else torch
"""

from __future__ import annotations

import importlib.util

from .autograd import KERNEL_DTYPES, TritonTokenDivergence
from .reference import TokenTerms
from .torch_path import chunked_terms, reference_terms
from .validation import Problem


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels_interpreted() -> bool:
    from .kernels import token_divergence_fwd_kernel

    return type(token_divergence_fwd_kernel).__name__ == "InterpretedFunction"


def resolve_backend(backend: str, problem: Problem) -> str:
    student = problem.student
    logits = [x for x in (student, problem.teacher) if x is not None]
    kernel_dtypes = all(x.dtype in KERNEL_DTYPES for x in logits)
    if backend == "auto":
        return "triton" if student.is_cuda and kernel_dtypes and triton_installed() else "torch"
    if backend != "triton":
        return backend
    if not triton_installed():
        raise ValueError('backend="triton" needs the triton package (pip install triton); use backend="torch"')
    if not kernel_dtypes:
        raise ValueError(
            f'backend="triton" supports float32, bfloat16 and float16 logits, got {", ".join(str(x.dtype) for x in logits)}'
        )
    if student.device.type == "cpu":
        if not _kernels_interpreted():
            raise ValueError(
                'backend="triton" on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 before '
                'importing wpkl, or use backend="torch"'
            )
    elif not student.is_cuda:
        raise ValueError(f'backend="triton" needs CUDA tensors, got {student.device}; use backend="torch"')
    return "triton"


def compute_terms(problem: Problem, backend: str, inplace_backward: bool = False, stats: bool = True) -> TokenTerms:
    """Per-token terms ([B, T] each; loss differentiable) from the resolved backend.

    ``stats=False``: the teacher confidence and the entropies are not needed (the torch path then skips them and
    reports NaN; the kernels compute them at no cost anyway)."""
    args = (problem.student, problem.teacher, problem.valid, problem.tokens, problem.teacher_logprobs,
            problem.rollout_logprobs, problem.divergence, problem.beta, problem.temperature)
    if backend == "triton":
        loss, out_stats = TritonTokenDivergence.apply(*args, inplace_backward)
        return TokenTerms(loss, *out_stats.unbind(0))
    if backend == "torch":
        return chunked_terms(*args, stats=stats)
    return reference_terms(*args)
