"""Input checks: every bad argument raises a ValueError or TypeError naming it, before any kernel runs.

``validate`` returns a ``Problem``: the inputs normalized to a [B, T, V] view (a 2-D [N, V] input
becomes B = 1, T = N without a copy) and [B, T] per-token tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .reference import DIVERGENCES
from .weighting import Weighting

REDUCTIONS = ("mean", "sum", "seq_mean", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Log-probabilities are <= 0; this much above 0 is accepted as rounding (a server's fp32 log_softmax of a
# near-certain token), anything larger is rejected (probabilities passed by mistake).
LOGPROB_TOLERANCE = 1e-3


@dataclass
class Problem:
    student: torch.Tensor  # [B, T, V]
    teacher: torch.Tensor | None  # [B, T, V_t], V_t >= V; None when "sampled" gets teacher_logprobs
    valid: torch.Tensor  # [B, T] bool
    tokens: torch.Tensor | None  # [B, T] int64
    teacher_logprobs: torch.Tensor | None  # [B, T] float: log q(y), instead of teacher logits
    rollout_logprobs: torch.Tensor | None  # [B, T] float: log p(y) under the policy that sampled y
    teacher_token_logprobs: torch.Tensor | None  # [B, T] float: log q(y), for weights that need it
    user_weights: torch.Tensor | None  # [B, T] float
    positions: torch.Tensor | None  # [B, T] int64
    leading_shape: torch.Size  # the caller's leading shape: (B, T) or (N,)
    packed: bool  # the caller passed [N, V] logits
    divergence: str
    beta: float
    temperature: float
    weighting: Weighting | None
    reduction: str
    num_items_in_batch: torch.Tensor | float | None


def _choice(name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _logits(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [B, T, V] or [N, V], got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension: {tuple(x.shape)}")
    return x


def _per_token(name: str, x, leading: torch.Size, device: torch.device, kinds: str, kind_text: str):
    """An optional per-token tensor of the leading shape and a dtype kind ('b' bool, 'i' int, 'f' float)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    kind = "b" if x.dtype == torch.bool else "f" if x.is_floating_point() else "c" if x.is_complex() else "i"
    if kind not in kinds:
        raise TypeError(f"{name} must be {kind_text} tensor, got {x.dtype}")
    if x.shape != leading:
        raise ValueError(f"{name} must have the logits' leading shape {tuple(leading)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    return x


def check_options(*, divergence, beta, temperature, reduction, weighting, backend="auto"):
    """The configuration arguments alone (shared by the function and WeightedKLLoss's constructor).

    Returns the normalized (reduction, beta, temperature)."""
    _choice("divergence", divergence, DIVERGENCES)
    _choice("backend", backend, BACKENDS)
    reduction = _choice("reduction", reduction, REDUCTIONS)
    beta = _real("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    temperature = _real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if weighting is not None and not isinstance(weighting, Weighting):
        raise TypeError(f"weighting must be a wpkl.Weighting or None, got {type(weighting).__name__}")
    return reduction, beta, temperature


def check_inplace_backward(inplace_backward, backend: str, resolved: str) -> None:
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and backend in ("torch", "reference"):
        raise ValueError(f'inplace_backward=True needs the Triton backend; backend={backend!r} always allocates the '
                         'gradient (with backend="auto" it is ignored off the Triton path)')


def validate(
    student_logits,
    teacher_logits,
    *,
    mask=None,
    weighting=None,
    token_weights=None,
    positions=None,
    tokens=None,
    divergence="reverse_kl",
    beta=0.5,
    temperature=1.0,
    reduction="mean",
    num_items_in_batch=None,
    teacher_logprobs=None,
    rollout_logprobs=None,
    teacher_token_logprobs=None,
    backend="auto",
) -> Problem:
    student = _logits("student_logits", student_logits)
    divergence = _choice("divergence", divergence, DIVERGENCES)
    if teacher_logits is None:
        if divergence != "sampled" or teacher_logprobs is None:
            raise ValueError('teacher_logits may be None only with divergence="sampled" and teacher_logprobs')
        teacher = None
    else:
        if teacher_logprobs is not None:
            raise ValueError("give teacher_logits or teacher_logprobs, not both")
        teacher = _checked_teacher(_logits("teacher_logits", teacher_logits), student)
    if divergence != "sampled" and rollout_logprobs is not None:
        raise ValueError('rollout_logprobs only applies to divergence="sampled"')
    reduction, beta, temperature = check_options(divergence=divergence, beta=beta, temperature=temperature,
                                                 reduction=reduction, weighting=weighting, backend=backend)
    vocab = student.shape[-1]
    if teacher is None and weighting is not None and weighting.confidence > 0:
        raise ValueError("Weighting(confidence=...) needs teacher_logits: teacher_logprobs carry no confidence")

    leading = student.shape[:-1]
    device = student.device
    mask = _per_token("mask", mask, leading, device, "b", "a bool")
    token_weights = _per_token("token_weights", token_weights, leading, device, "f", "a floating-point")
    positions = _per_token("positions", positions, leading, device, "i", "an integer")
    tokens = _per_token("tokens", tokens, leading, device, "i", "an integer")
    teacher_logprobs = _per_token("teacher_logprobs", teacher_logprobs, leading, device, "f", "a floating-point")
    rollout_logprobs = _per_token("rollout_logprobs", rollout_logprobs, leading, device, "f", "a floating-point")
    teacher_token_logprobs = _per_token("teacher_token_logprobs", teacher_token_logprobs, leading, device, "f",
                                        "a floating-point")
    if teacher_token_logprobs is not None and teacher_logprobs is not None:
        raise ValueError("give teacher_logprobs or teacher_token_logprobs, not both: they are the same log q(y)")
    if weighting is not None and weighting.needs_teacher_token_logprobs and teacher_token_logprobs is None \
            and teacher_logprobs is None and tokens is None:
        raise ValueError("Weighting(prefix_confidence=...) needs log q(y) of the sampled tokens: pass "
                         "teacher_token_logprobs, or tokens (then computed from teacher_logits on the torch backends)")
    if divergence == "sampled" and tokens is None:
        raise ValueError('divergence="sampled" needs tokens: the token sampled at each position')

    packed = student.dim() == 2
    if packed:
        if positions is None and reduction == "seq_mean":
            raise ValueError('reduction="seq_mean" on [N, V] input needs positions (a 0 starts each sequence)')
        if positions is None and weighting is not None and weighting.position is not None:
            raise ValueError("position weighting on [N, V] input needs positions (or pass [B, T, V] logits)")
        if weighting is not None and weighting.accumulated > 0:
            raise ValueError("Weighting(accumulated=...) needs [B, T, V] input: it sums over each sequence's prefix")
        if positions is None and weighting is not None and weighting.prefix_confidence is not None:
            raise ValueError("Weighting(prefix_confidence=...) on [N, V] input needs positions (or pass [B, T, V] "
                             "logits): its window looks back within each sequence")

    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f'num_items_in_batch replaces the token count of reduction="mean", not {reduction!r}')
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
            if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
                raise TypeError(f"num_items_in_batch must be a real number, got a {num_items_in_batch.dtype} tensor")
        else:
            num_items_in_batch = _real("num_items_in_batch", num_items_in_batch)

    valid = mask if mask is not None else torch.ones(leading, dtype=torch.bool, device=device)
    _check_values(valid, vocab, token_weights=token_weights, positions=positions, tokens=tokens,
                  logprobs={"teacher_logprobs": teacher_logprobs, "rollout_logprobs": rollout_logprobs,
                            "teacher_token_logprobs": teacher_token_logprobs},
                  num_items_in_batch=num_items_in_batch)

    def per_token(x):  # [N] -> [1, N] for packed input: a view, never a copy
        return x if x is None or not packed else x.unsqueeze(0)

    def contiguous_vocab(x):  # the kernels need a contiguous vocabulary dimension; other strides are free
        return x if x is None or x.stride(-1) == 1 else x.contiguous()

    return Problem(
        student=contiguous_vocab(per_token(student)),
        teacher=contiguous_vocab(per_token(teacher)),
        valid=per_token(valid),
        tokens=per_token(None if tokens is None else tokens.long()),
        teacher_logprobs=per_token(teacher_logprobs),
        rollout_logprobs=per_token(rollout_logprobs),
        teacher_token_logprobs=per_token(teacher_token_logprobs),
        user_weights=per_token(token_weights),
        positions=per_token(None if positions is None else positions.long()),
        leading_shape=leading,
        packed=packed,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        weighting=weighting,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
    )


def _checked_teacher(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"teacher_logits leading shape {tuple(teacher.shape[:-1])} does not match "
            f"student_logits leading shape {tuple(student.shape[:-1])}"
        )
    if teacher.shape[-1] < student.shape[-1]:
        raise ValueError(
            f"teacher_logits has vocabulary {teacher.shape[-1]} < the student's {student.shape[-1]}; "
            "a padded teacher vocabulary may be larger (its first V columns are used), never smaller"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    return teacher


def _check_values(valid, vocab, *, token_weights, positions, tokens, logprobs, num_items_in_batch) -> None:
    """Value checks on the valid tokens, with at most one host sync for all of them together."""
    checks = []
    for name, x in logprobs.items():
        if x is not None:
            checks.append((f"{name} must be finite on valid tokens", valid & ~torch.isfinite(x)))
            checks.append((f"{name} must be log-probabilities (<= 0, up to {LOGPROB_TOLERANCE} of rounding) on valid "
                           "tokens; were probabilities passed?", valid & (x > LOGPROB_TOLERANCE)))
    if num_items_in_batch is not None:
        # With no valid token the loss is 0 whatever the count (an empty micro-batch); otherwise it divides.
        count = torch.as_tensor(num_items_in_batch, device=valid.device)
        bad_count = valid.any() & ~(torch.isfinite(count) & (count > 0)).reshape(())
        checks.append(("num_items_in_batch must be finite and > 0 when there are valid tokens", bad_count))
    if token_weights is not None:
        bad = valid & ~(torch.isfinite(token_weights) & (token_weights >= 0))
        checks.append(("token_weights must be finite and >= 0 on valid tokens", bad))
    if positions is not None:
        checks.append(("positions must be >= 0 on valid tokens", valid & (positions < 0)))
    if tokens is not None:
        checks.append((f"tokens must lie in [0, V) = [0, {vocab}) on valid tokens", valid & ((tokens < 0) | (tokens >= vocab))))
    if not checks:
        return
    flags = torch.stack([bad.any() for _, bad in checks]).tolist()
    for (message, _), failed in zip(checks, flags, strict=True):
        if failed:
            raise ValueError(message)
