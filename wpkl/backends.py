"""Backend dispatch: which implementation computes the per-token terms over the vocabulary.

    triton     the fused kernels (wpkl/ops.py, wpkl/vocab_pass.py): CUDA tensors, or CPU tensors under
               TRITON_INTERPRET=1
    torch      the chunked pure-torch path (wpkl/torch_path.py): any device, bounded memory
    reference  the specification (wpkl/reference.py) on all valid rows at once: float64-capable, for tests
               (the fused-linear form materializes its logits for it)

Both input forms (materialized logits; hidden states with lm_head weights, wpkl/fused_linear.py) run the same
vocabulary pass (wpkl/vocab_pass.py) per block of tokens.
    auto       triton for CUDA tensors in float32/bfloat16/float16 when Triton is installed, else torch
"""

from __future__ import annotations

import importlib.util

import torch

from .fused_linear import FusedLinearTokenDivergence, LinearSpec, chunk_size_for, plan_chunks
from .projection import project
from .reference import TokenTerms, TopKOptions
from .torch_path import chunked_terms, reference_terms
from .validation import Problem
from .vocab_pass import KERNEL_DTYPES, PassSpec, TritonPass


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels_interpreted() -> bool:
    from .kernels import token_divergence_fwd_kernel

    return type(token_divergence_fwd_kernel).__name__ == "InterpretedFunction"


def _input_dtypes(problem: Problem) -> list:
    if problem.linear is None:
        return [x.dtype for x in (problem.student, problem.teacher) if x is not None]
    # The fused-linear form hands the kernels float32 logits; float64 hidden states project to float64 logits
    # (the torch pass only). A float64 weight with float32 hidden states projects in float32.
    lin = problem.linear
    hidden = [x for x in (lin.student_hidden, lin.teacher_hidden) if x is not None]
    return [torch.float64 if any(x.dtype == torch.float64 for x in hidden) else torch.float32]


def resolve_backend(backend: str, problem: Problem) -> str:
    device = problem.device
    dtypes = _input_dtypes(problem)
    kernel_dtypes = all(d in KERNEL_DTYPES for d in dtypes)
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernel_dtypes and triton_installed() else "torch"
    if backend != "triton":
        return backend
    if not triton_installed():
        raise ValueError('backend="triton" needs the triton package (pip install triton); use backend="torch"')
    if not kernel_dtypes:
        raise ValueError(f'backend="triton" supports float32, bfloat16 and float16 logits, got '
                         f'{", ".join(str(d) for d in dtypes)}')
    if device.type == "cpu":
        if not _kernels_interpreted():
            raise ValueError(
                'backend="triton" on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 before '
                'importing wpkl, or use backend="torch"'
            )
    elif device.type != "cuda":
        raise ValueError(f'backend="triton" needs CUDA tensors, got {device}; use backend="torch"')
    return "triton"


def compute_terms(problem: Problem, backend: str, stats: bool = True, coefficients=None,
                  inplace_backward: bool = False) -> TokenTerms:
    """Per-token terms ([B, T] each; loss differentiable) from the resolved backend, for the weighting and
    reduction in torch (wpkl/api.py). Materialized logits on the Triton backend do not come here (their weights
    and reduction run in a kernel too, wpkl/ops.py), except with a top-k teacher: its vocabulary pass runs on the
    kernels (wpkl/vocab_pass.py ``_topk_forward``), its weights and reduction in torch.

    ``stats=False``: the teacher confidence and the entropies are not needed (the torch path then skips them and
    reports NaN). ``coefficients``: the fused-linear form's eager schedule (wpkl/fused_linear.py), or None."""
    if problem.linear is not None:
        return linear_terms(problem, backend, stats, coefficients)
    spec = pass_spec(problem, stats)
    args = (problem.student, problem.teacher, problem.topk_ids, problem.topk_logprobs, problem.valid, problem.tokens,
            problem.teacher_logprobs, problem.rollout_logprobs)
    if backend == "torch":
        return chunked_terms(*args, spec)
    if backend == "triton" and spec.shard is not None:  # vocabulary-parallel: wpkl/tensor_parallel.py
        from .tensor_parallel import ShardedTritonTerms

        loss, stats = ShardedTritonTerms.apply(problem.student, problem.teacher, problem.valid, problem.tokens,
                                               problem.teacher_logprobs, problem.rollout_logprobs, spec)
        return TokenTerms(loss, *stats.unbind(0))
    if backend == "triton":  # one device: only a top-k teacher comes here (see the docstring)
        return chunked_terms(*args, spec, passes=TritonPass, inplace_backward=inplace_backward)
    return reference_terms(*args, spec)


def pass_spec(problem: Problem, stats: bool = True) -> PassSpec:
    return PassSpec(problem.divergence, problem.beta, problem.temperature, stats,
                    TopKOptions(problem.topk_mode, problem.topk_logprob_floor, problem.topk_loss_max), problem.shard)


def linear_terms(problem: Problem, backend: str, stats: bool, coefficients) -> TokenTerms:
    """The fused-linear form: chunks of hidden states through the vocabulary pass (wpkl/fused_linear.py).
    ``backend="reference"`` materializes the logits and runs the specification (for tests)."""
    lin = problem.linear
    B, T = problem.valid.shape
    if backend == "reference":
        # Vocabulary-parallel: the hidden states feed every rank's slice, so their gradient is summed over the
        # group (Megatron's copy operator), as the fused path's all-reduce of grad_h does.
        hidden = lin.student_hidden if problem.shard is None else problem.shard.copy(lin.student_hidden)
        student = project(hidden, lin.student_weight, lin.student_bias, lin.student_logit_scale, lin.student_softcap)
        teacher = None
        if lin.teacher_hidden is not None:
            with torch.no_grad():
                teacher = project(lin.teacher_hidden, lin.teacher_weight[:problem.vocab],
                                  None if lin.teacher_bias is None else lin.teacher_bias[:problem.vocab],
                                  lin.teacher_logit_scale, lin.teacher_softcap)
        return reference_terms(student, teacher, problem.topk_ids, problem.topk_logprobs, problem.valid,
                               problem.tokens, problem.teacher_logprobs, problem.rollout_logprobs, pass_spec(problem))
    spec = LinearSpec(pass_spec(problem, stats), backend,
                      lin.student_logit_scale, lin.student_softcap, lin.teacher_logit_scale, lin.teacher_softcap)
    hidden = lin.student_hidden.shape[-1]
    chunk = lin.chunk_size or chunk_size_for(problem.vocab, hidden, backend)
    chunks = None
    if coefficients is not None:
        chunks = plan_chunks(problem.valid, chunk, whole_rows=coefficients.whole_rows)
        if chunks is None:  # a sequence longer than a chunk: its prefix weights need the two-phase schedule
            coefficients = None
    if chunks is None:
        chunks = plan_chunks(problem.valid, chunk, whole_rows=False)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:])

    loss, out_stats = FusedLinearTokenDivergence.apply(
        flat(lin.student_hidden), lin.student_weight, lin.student_bias, flat(lin.teacher_hidden), lin.teacher_weight,
        lin.teacher_bias, flat(problem.valid), flat(problem.tokens), flat(problem.teacher_logprobs),
        flat(problem.rollout_logprobs), flat(problem.topk_ids), flat(problem.topk_logprobs), spec, chunks,
        coefficients)
    return TokenTerms(loss.view(B, T), *out_stats.view(4, B, T).unbind(0))
