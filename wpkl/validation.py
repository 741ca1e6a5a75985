"""Input checks: every bad argument raises a ValueError or TypeError naming it, before any kernel runs.

``validate`` returns a ``Problem``: the inputs normalized to a [B, T, V] view (a 2-D [N, V] input
becomes B = 1, T = N without a copy) and [B, T] per-token tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .checks import run_checks
from .reference import DIVERGENCES, TOPK_MODES
from .weighting import Weighting

REDUCTIONS = ("mean", "sum", "seq_mean", "none")
BACKENDS = ("auto", "triton", "torch", "reference")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Log-probabilities are <= 0; this much above 0 is accepted as rounding (a server's fp32 log_softmax of a
# near-certain token), anything larger is rejected (probabilities passed by mistake).
LOGPROB_TOLERANCE = 1e-3


@dataclass
class LinearInputs:
    """The fused-linear form: logits = softcap(scale * (hidden @ weight.T + bias)), never materialized."""

    student_hidden: torch.Tensor  # [B, T, H]
    student_weight: torch.Tensor  # [V, H]
    student_bias: torch.Tensor | None  # [V]
    teacher_hidden: torch.Tensor | None  # [B, T, H_t]; None with teacher_logprobs
    teacher_weight: torch.Tensor | None  # [V_t >= V, H_t] (the first V rows are used)
    teacher_bias: torch.Tensor | None  # [V_t]
    student_logit_scale: float
    teacher_logit_scale: float
    student_softcap: float | None
    teacher_softcap: float | None
    chunk_size: int | None  # tokens per chunk; None: from the memory budget


@dataclass
class Problem:
    student: torch.Tensor | None  # [B, T, V] logits; None for the fused-linear form
    teacher: torch.Tensor | None  # [B, T, V_t], V_t >= V; None with teacher_logprobs or the fused-linear form
    valid: torch.Tensor  # [B, T] bool
    tokens: torch.Tensor | None  # [B, T] int64
    teacher_logprobs: torch.Tensor | None  # [B, T] float: log q(y), instead of teacher logits
    rollout_logprobs: torch.Tensor | None  # [B, T] float: log p(y) under the policy that sampled y
    user_weights: torch.Tensor | None  # [B, T] float
    positions: torch.Tensor | None  # [B, T] int64
    leading_shape: torch.Size  # the caller's leading shape: (B, T) or (N,)
    packed: bool  # the caller passed [N, ...] input
    divergence: str
    beta: float
    temperature: float
    weighting: Weighting | None
    reduction: str
    num_items_in_batch: torch.Tensor | float | None
    vocab: int = 0
    device: torch.device | None = None
    linear: LinearInputs | None = None
    topk_ids: torch.Tensor | None = None  # [B, T, K] int64: a top-k teacher's ids (-1 pads)
    topk_logprobs: torch.Tensor | None = None  # [B, T, K] float: its log q of those ids
    topk_mode: str = "tail"
    topk_logprob_floor: float | None = None
    topk_loss_max: float | None = None
    teacher_token_logprobs: torch.Tensor | None = None  # [B, T] float: log q(y), for weights that need it
    shard: object = None  # a vocabulary-parallel call's wpkl.tensor_parallel.VocabShard (None: one device)


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
    backend="auto",
    **topk,
) -> Problem:
    """The materialized form: [B, T, V] or [N, V] student and teacher logits (or a top-k teacher: ``topk`` holds
    teacher_topk_ids, teacher_topk_logprobs, topk_mode, topk_logprob_floor, topk_loss_max)."""
    student = _logits("student_logits", student_logits)
    teacher = None
    if teacher_logits is not None:
        teacher = _checked_teacher(_logits("teacher_logits", teacher_logits), student)
    problem = _problem(student.shape[:-1], student.device, student.shape[-1], "teacher_logits", teacher is not None,
                       mask=mask, weighting=weighting, token_weights=token_weights, positions=positions,
                       tokens=tokens, divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                       num_items_in_batch=num_items_in_batch, teacher_logprobs=teacher_logprobs,
                       rollout_logprobs=rollout_logprobs, backend=backend, **topk)

    def contiguous_vocab(x):  # the kernels need a contiguous vocabulary dimension; other strides are free
        return x if x is None or x.stride(-1) == 1 else x.contiguous()

    problem.student = contiguous_vocab(_rows_view(student, problem.packed))
    problem.teacher = contiguous_vocab(_rows_view(teacher, problem.packed))
    return problem


def check_linear_options(*, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap, chunk_size):
    """The fused-linear form's configuration (shared by the function and its module's constructor).

    Returns the normalized ([student scale, teacher scale], [student softcap, teacher softcap])."""
    scales = [_real(name, value) for name, value in (("student_logit_scale", student_logit_scale),
                                                     ("teacher_logit_scale", teacher_logit_scale))]
    caps = []
    for name, cap in (("student_softcap", student_softcap), ("teacher_softcap", teacher_softcap)):
        if cap is not None:
            cap = _real(name, cap)
            if cap <= 0:
                raise ValueError(f"{name} must be > 0 (or None), got {cap}")
        caps.append(cap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (tokens per chunk) or None, got {chunk_size!r}")
    return scales, caps


def validate_linear(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    student_bias=None,
    teacher_bias=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
    chunk_size=None,
    **common,
) -> Problem:
    """The fused-linear form: hidden states [B, T, H] or [N, H] and lm_head weights [V, H]."""
    hidden = _float_tensor("student_hidden", student_hidden)
    if hidden.dim() not in (2, 3) or hidden.shape[-1] == 0:
        raise ValueError(f"student_hidden must have shape [B, T, H] or [N, H] with H > 0, got {tuple(hidden.shape)}")
    device = hidden.device
    weight = _weight("student_weight", student_weight, hidden.shape[-1], "student_hidden", device)
    vocab = weight.shape[0]
    bias = _bias("student_bias", student_bias, vocab, device)
    t_hidden = t_weight = t_bias = None
    if teacher_hidden is None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight and teacher_bias need teacher_hidden (None only with teacher_logprobs or "
                             "a top-k teacher)")
    else:
        t_hidden = _float_tensor("teacher_hidden", teacher_hidden)
        if t_hidden.shape[:-1] != hidden.shape[:-1] or t_hidden.dim() != hidden.dim() or t_hidden.shape[-1] == 0:
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(hidden.shape[:-1])} and "
                             f"a hidden size > 0, got {tuple(t_hidden.shape)}")
        if t_hidden.device != device:
            raise ValueError(f"teacher_hidden is on {t_hidden.device} but student_hidden is on {device}")
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head weight [V_t, H_t])")
        t_weight = _weight("teacher_weight", teacher_weight, t_hidden.shape[-1], "teacher_hidden", device)
        if t_weight.shape[0] < vocab:
            raise ValueError(f"teacher_weight has vocabulary {t_weight.shape[0]} < the student's {vocab}; a padded "
                             "teacher vocabulary may be larger (its first V rows are used), never smaller")
        t_bias = _bias("teacher_bias", teacher_bias, t_weight.shape[0], device)
    scales, caps = check_linear_options(student_logit_scale=student_logit_scale,
                                        teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                                        teacher_softcap=teacher_softcap, chunk_size=chunk_size)

    problem = _problem(hidden.shape[:-1], device, vocab, "teacher_hidden", t_hidden is not None, **common)
    problem.linear = LinearInputs(
        student_hidden=_rows_view(hidden, problem.packed), student_weight=weight, student_bias=bias,
        teacher_hidden=_rows_view(t_hidden, problem.packed), teacher_weight=t_weight, teacher_bias=t_bias,
        student_logit_scale=scales[0], teacher_logit_scale=scales[1], student_softcap=caps[0],
        teacher_softcap=caps[1], chunk_size=chunk_size,
    )
    return problem


def _float_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


def _weight(name: str, weight, hidden_size: int, hidden_name: str, device) -> torch.Tensor:
    weight = _float_tensor(name, weight)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"{name} must be an lm_head weight [V, H] with V > 0, got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden_size:
        raise ValueError(f"{name} has hidden size {weight.shape[1]} but {hidden_name} has {hidden_size}")
    if weight.device != device:
        raise ValueError(f"{name} is on {weight.device} but {hidden_name} is on {device}")
    return weight


def _bias(name: str, bias, vocab: int, device) -> torch.Tensor | None:
    if bias is None:
        return None
    bias = _float_tensor(name, bias)
    if bias.shape != (vocab,):
        raise ValueError(f"{name} must have shape [{vocab}] (one per lm_head row), got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"{name} is on {bias.device} but the hidden states are on {device}")
    return bias


def _topk(ids, logprobs, leading, device, teacher_name, teacher_given, *, divergence, teacher_logprobs, mode,
          floor, loss_max):
    """The top-k teacher's arguments: None when not given, else (ids int64, logprobs, mode, floor, loss_max)."""
    if ids is None and logprobs is None:
        if mode != "tail" or floor is not None or loss_max is not None:
            raise ValueError("topk_mode, topk_logprob_floor and topk_loss_max need teacher_topk_ids and "
                             "teacher_topk_logprobs")
        return None
    if ids is None or logprobs is None:
        raise ValueError("give teacher_topk_ids and teacher_topk_logprobs together")
    if teacher_given:
        raise ValueError(f"give {teacher_name} or teacher_topk_ids/teacher_topk_logprobs, not both")
    if teacher_logprobs is not None:
        raise ValueError("teacher_logprobs is the sampled-token form; a top-k teacher gives teacher_topk_logprobs")
    if divergence == "sampled":
        raise ValueError('a top-k teacher takes divergence "forward_kl", "reverse_kl" or "jsd" ("sampled" takes '
                         "teacher_logprobs, the teacher's log-prob of the sampled token)")
    mode = _choice("topk_mode", mode, TOPK_MODES)
    for name, x, kind in (("teacher_topk_ids", ids, "i"), ("teacher_topk_logprobs", logprobs, "f")):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        is_float = x.is_floating_point()
        if (kind == "f") != is_float or x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be {'a floating-point' if kind == 'f' else 'an integer'} tensor, got {x.dtype}")
        if x.dim() != len(leading) + 1 or x.shape[:-1] != leading or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape {tuple(leading)} + (K,) with K >= 1, got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(logprobs.shape)} "
                         "must have the same shape")
    values = []
    for name, x in (("topk_logprob_floor", floor), ("topk_loss_max", loss_max)):
        if x is not None:
            if mode != "raw":
                raise ValueError(f'{name} applies to topk_mode="raw" (verl\'s clamps), not {mode!r}')
            x = _real(name, x)
        values.append(x)
    return ids.long(), logprobs, mode, values[0], values[1]


def _rows_view(x, packed: bool):
    """[N, ...] -> [1, N, ...] for packed input: a view, never a copy."""
    return x if x is None or not packed else x.unsqueeze(0)


def _problem(leading, device, vocab, teacher_name, teacher_given, *, mask, weighting, token_weights, positions,
             tokens, divergence, beta, temperature, reduction, num_items_in_batch, teacher_logprobs,
             rollout_logprobs, backend, teacher_topk_ids=None, teacher_topk_logprobs=None, topk_mode="tail",
             topk_logprob_floor=None, topk_loss_max=None, teacher_token_logprobs=None) -> Problem:
    """The checks both input forms share: options and per-token tensors. Their values: ``check_values``."""
    divergence = _choice("divergence", divergence, DIVERGENCES)
    topk = _topk(teacher_topk_ids, teacher_topk_logprobs, leading, device, teacher_name, teacher_given,
                 divergence=divergence, teacher_logprobs=teacher_logprobs, mode=topk_mode,
                 floor=topk_logprob_floor, loss_max=topk_loss_max)
    if topk is not None:
        teacher_given = True
    if not teacher_given:
        if divergence != "sampled" or teacher_logprobs is None:
            raise ValueError(f'{teacher_name} may be None only with divergence="sampled" and teacher_logprobs')
    elif teacher_logprobs is not None:
        raise ValueError(f"give {teacher_name} or teacher_logprobs, not both")
    if divergence != "sampled" and rollout_logprobs is not None:
        raise ValueError('rollout_logprobs only applies to divergence="sampled"')
    reduction, beta, temperature = check_options(divergence=divergence, beta=beta, temperature=temperature,
                                                 reduction=reduction, weighting=weighting, backend=backend)
    if not teacher_given and weighting is not None and weighting.confidence > 0:
        raise ValueError(f"Weighting(confidence=...) needs {teacher_name}: teacher_logprobs carry no confidence")

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
            and teacher_logprobs is None and (tokens is None or teacher_name != "teacher_logits" or topk is not None):
        raise ValueError("Weighting(prefix_confidence=...) needs log q(y) of the sampled tokens: pass "
                         "teacher_token_logprobs (or, with teacher_logits, tokens: then it is computed from them on "
                         "the torch backends)")
    if divergence == "sampled" and tokens is None:
        raise ValueError('divergence="sampled" needs tokens: the token sampled at each position')

    packed = len(leading) == 1
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

    return Problem(
        student=None,
        teacher=None,
        valid=_rows_view(valid, packed),
        tokens=_rows_view(None if tokens is None else tokens.long(), packed),
        teacher_logprobs=_rows_view(teacher_logprobs, packed),
        rollout_logprobs=_rows_view(rollout_logprobs, packed),
        teacher_token_logprobs=_rows_view(teacher_token_logprobs, packed),
        user_weights=_rows_view(token_weights, packed),
        positions=_rows_view(None if positions is None else positions.long(), packed),
        leading_shape=leading,
        packed=packed,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        weighting=weighting,
        reduction=reduction,
        num_items_in_batch=num_items_in_batch,
        vocab=vocab,
        device=device,
        **({} if topk is None else dict(
            topk_ids=_rows_view(topk[0], packed), topk_logprobs=_rows_view(topk[1], packed), topk_mode=topk[2],
            topk_logprob_floor=topk[3], topk_loss_max=topk[4])),
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


# The value checks, in the order of the weights kernel's flags (kernels/token_weights.py).
CHECKS = ("token_weights", "positions", "tokens", "teacher_logprobs_finite", "teacher_logprobs_range",
          "rollout_logprobs_finite", "rollout_logprobs_range", "num_items_in_batch")


# Checks of inputs only the torch weights read (the Triton path does not take them).
TORCH_CHECKS = ("teacher_token_logprobs_finite", "teacher_token_logprobs_range")

# The top-k teacher's checks (torch ops on every path).
TOPK_CHECKS = ("topk_ids_range", "topk_ids_duplicate", "topk_logprobs_finite", "topk_logprobs_range")


def check_message(check: str, vocab: int) -> str:
    if check == "topk_ids_range":
        return f"teacher_topk_ids must lie in [0, V) = [0, {vocab}), or be -1 (padding), on valid tokens"
    if check == "topk_ids_duplicate":
        return "teacher_topk_ids must not repeat an id within a token's list (padding -1 aside)"
    if check == "topk_logprobs_finite":
        return "teacher_topk_logprobs must not be NaN on the given ids (-inf is a token the teacher bans)"
    if check == "topk_logprobs_range":
        return (f"teacher_topk_logprobs must be log-probabilities (<= 0, up to {LOGPROB_TOLERANCE} of rounding) on "
                "the given ids; were probabilities passed?")
    if check == "token_weights":
        return "token_weights must be finite and >= 0 on valid tokens"
    if check == "positions":
        return "positions must be >= 0 on valid tokens"
    if check == "tokens":
        return f"tokens must lie in [0, V) = [0, {vocab}) on valid tokens"
    if check == "num_items_in_batch":
        return "num_items_in_batch must be finite and > 0 when there are valid tokens"
    name, kind = check.rsplit("_", 1)
    if kind == "finite":
        return f"{name} must be finite on valid tokens"
    return (f"{name} must be log-probabilities (<= 0, up to {LOGPROB_TOLERANCE} of rounding) on valid tokens; were "
            "probabilities passed?")


def check_values(problem: Problem) -> None:
    """The checks that need the data, as torch ops: at once on the CPU, without a host sync on CUDA
    (wpkl/checks.py). The Triton path makes the same checks inside its weights kernel instead."""
    valid = problem.valid
    vocab = problem.vocab if problem.shard is None else problem.shard.vocab  # token ids are global
    bad = {}
    if problem.user_weights is not None:
        w = problem.user_weights
        bad["token_weights"] = valid & ~(torch.isfinite(w) & (w >= 0))
    if problem.positions is not None:
        bad["positions"] = valid & (problem.positions < 0)
    if problem.tokens is not None:
        bad["tokens"] = valid & ((problem.tokens < 0) | (problem.tokens >= vocab))
    for name, x in (("teacher_logprobs", problem.teacher_logprobs), ("rollout_logprobs", problem.rollout_logprobs),
                    ("teacher_token_logprobs", problem.teacher_token_logprobs)):
        if x is not None:
            bad[f"{name}_finite"] = valid & ~torch.isfinite(x)
            bad[f"{name}_range"] = valid & (x > LOGPROB_TOLERANCE)
    if problem.topk_ids is not None:
        ids, logprobs = problem.topk_ids, problem.topk_logprobs
        atoms = valid.unsqueeze(-1) & (ids >= 0)
        bad["topk_ids_range"] = valid.unsqueeze(-1) & ((ids < -1) | (ids >= vocab))
        ordered = ids.sort(dim=-1).values
        bad["topk_ids_duplicate"] = valid.unsqueeze(-1) & (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        bad["topk_logprobs_finite"] = atoms & torch.isnan(logprobs)
        bad["topk_logprobs_range"] = atoms & (logprobs > LOGPROB_TOLERANCE)
    if problem.num_items_in_batch is not None:
        # With no valid token the loss is 0 whatever the count (an empty micro-batch); otherwise it divides.
        count = torch.as_tensor(problem.num_items_in_batch, device=valid.device)
        bad["num_items_in_batch"] = valid.any() & ~(torch.isfinite(count) & (count > 0)).reshape(())
    run_checks([(check_message(name, vocab), bad[name]) for name in CHECKS + TOPK_CHECKS + TORCH_CHECKS if name in bad])
