"""The Triton path as torch custom ops (``torch.library``), so that ``torch.compile`` traces a training step through
``weighted_kl_loss`` without graph breaks: Dynamo does not look inside the ops, and their fake implementations
give the output shapes.

    wpkl::weighted_loss            forward: the vocabulary pass, then the weights kernel (wpkl/backends/triton_pass.py's
                                   kernels and launch code); returns the loss, the kernel statistics, the
                                   weights, positions and the per-token coefficients d loss / d L_i
    wpkl::weighted_loss_backward   writes d loss / d student into ``out`` (the logits' own storage with
                                   ``inplace_backward`` outside torch.compile, a new buffer otherwise)

Options travel as plain numbers and strings (a custom op's schema has no room for a ``Weighting``):
``weighting`` is ``wpkl.backends.weights_kernel.encode_weighting``'s list, a PositionTable's values a tensor: the
specification is flattened here, at the custom-op boundary, and nowhere else (wpkl/engine/fused.py).
"""

from __future__ import annotations

import math

import torch

from ..inputs.checks import run_flags
from ..inputs.values import CHECKS, LOGPROB_TOLERANCE, check_message
from ..spec import LossSpec
from .common import divergence_id, kernels, launch, num_stats
from .triton_pass import TritonPass, TritonSaved
from .weights_kernel import weights_launch


def _spec(divergence: str, beta: float, temperature: float, sampled_power: float | None = None) -> LossSpec:
    return LossSpec(divergence=divergence, beta=beta, temperature=temperature, sampled_power=sampled_power)

@torch.library.custom_op("wpkl::weighted_loss", mutates_args=())
def weighted_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    valid: torch.Tensor,
    tokens: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    rollout_logprobs: torch.Tensor | None,
    user_weights: torch.Tensor | None,
    positions: torch.Tensor | None,
    num_items: torch.Tensor | None,
    position_table: torch.Tensor | None,
    divergence: str,
    beta: float,
    temperature: float,
    sampled_power: float | None,
    weighting: list[float],
    reduction: str,
    segments: int,
    num_items_value: float,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, V = student.shape
    loss, _, saved = TritonPass.forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs,
                                        _spec(divergence, beta, temperature, sampled_power))
    stats = saved.stats.view(saved.stats.shape[0], B, T)
    if B * T == 0:
        zeros = student.new_zeros((B, T), dtype=torch.float32)
        out = zeros.clone() if reduction == "none" else student.new_zeros((), dtype=torch.float32)
        return out, stats, zeros.clone(), zeros.clone(), zeros.clone()
    grid, args, meta, w = weights_launch(
        saved.valid_bytes, stats[0], stats[1], loss, weighting=weighting, table=position_table, reduction=reduction,
        segments=segments, row_length=T, vocab=V, user_weights=user_weights, positions=positions,
        tokens=tokens, teacher_logprobs=teacher_logprobs, rollout_logprobs=rollout_logprobs,
        num_items_in_batch=num_items if num_items is not None else
        (None if math.isnan(num_items_value) else num_items_value), logprob_tolerance=LOGPROB_TOLERANCE)
    launch(kernels().token_weights_kernel, grid, args, meta)
    run_flags(w.flags, [check_message(name, V) for name in CHECKS])
    out = w.out.view(B, T) if reduction == "none" else w.out.view(())
    return out, stats, w.weight.view(B, T), w.position.view(B, T), w.coef.view(B, T)


@weighted_loss.register_fake
def _(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, user_weights, positions, num_items,
      position_table, divergence, beta, temperature, sampled_power, weighting, reduction, segments, num_items_value,
      inplace_backward):
    B, T, _ = student.shape

    def per_token():  # a fresh tensor per output: outputs never alias each other
        return student.new_empty((B, T), dtype=torch.float32)

    out = per_token() if reduction == "none" else student.new_empty((), dtype=torch.float32)
    stats = student.new_empty((num_stats(), B, T), dtype=torch.float32)
    return out, stats, per_token(), per_token(), per_token()


@torch.library.custom_op("wpkl::weighted_loss_backward", mutates_args=("out",))
def weighted_loss_backward(out: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None,
                           valid: torch.Tensor, tokens: torch.Tensor | None, stats: torch.Tensor, coef: torch.Tensor,
                           divergence: str, beta: float, temperature: float) -> None:
    B, T, _ = student.shape
    spec = _spec(divergence, beta, temperature)
    saved = TritonSaved(student, teacher, valid.reshape(B * T).to(torch.int8),
                        None if tokens is None else tokens.reshape(B * T), stats.reshape(stats.shape[0], B * T),
                        divergence_id(spec.exact_divergence), spec)
    TritonPass.backward(saved, coef, out)


@weighted_loss_backward.register_fake
def _(out, student, teacher, valid, tokens, stats, coef, divergence, beta, temperature):
    return None


def _setup_context(ctx, inputs, output):
    student, teacher, valid, tokens = inputs[:4]
    divergence, beta, temperature = inputs[10:13]
    _, stats, _, _, coef = output
    ctx.save_for_backward(student, teacher, valid, tokens, stats, coef)
    ctx.options = (divergence, beta, temperature)
    ctx.inplace_backward = inputs[-1]


def _backward(ctx, grad_out, grad_stats, grad_weight, grad_position, grad_coef):
    student, teacher, valid, tokens, stats, coef = ctx.saved_tensors
    # In place only outside torch.compile (quack's rule: a compiled graph must not see the logits overwritten).
    inplace = ctx.inplace_backward and not torch.compiler.is_compiling()
    out = student if inplace else torch.empty_like(student)
    weighted_loss_backward(out, student, teacher, valid, tokens, stats, coef * grad_out.to(coef.dtype),
                           *ctx.options)
    return (out,) + (None,) * 18


weighted_loss.register_autograd(_backward, setup_context=_setup_context)
