"""From a call's arguments to a ``Problem``: every bad argument raises a ValueError or TypeError naming it, before
any kernel runs. The checks that need the data's values (a token out of range, a negative weight) are
wpkl/inputs/values.py's.

``materialized`` takes [B, T, V] or [N, V] logits, ``linear`` hidden states and lm_head weights; both share
``_batch_and_teacher`` (the per-token tensors and the teacher source, checked against the spec).
"""

from __future__ import annotations

import torch

from ..spec import LossSpec, real
from . import tensors
from .data import Problem, StudentLinear, StudentLogits, TeacherLinear, TeacherLogits, TeacherLogprobs, TeacherTopK
from .data import TokenBatch


def _rows_view(x, packed: bool):
    """[N, ...] -> [1, N, ...] for packed input: a view, never a copy."""
    return x if x is None or not packed else x.unsqueeze(0)


def _contiguous_vocab(x):
    """The kernels need a contiguous vocabulary dimension; other strides are free."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def materialized(spec: LossSpec, student_logits, teacher_logits, *, mask=None, token_weights=None, positions=None,
                 tokens=None, num_items_in_batch=None, teacher_logprobs=None, rollout_logprobs=None,
                 teacher_token_logprobs=None, teacher_topk_ids=None, teacher_topk_logprobs=None,
                 sequence_ids=None, sequence_bounds=None) -> Problem:
    student = tensors.logits("student_logits", student_logits)
    teacher = None
    if teacher_logits is not None:
        teacher = tensors.logits("teacher_logits", teacher_logits)
        if teacher.shape[:-1] != student.shape[:-1]:
            raise ValueError(f"teacher_logits leading shape {tuple(teacher.shape[:-1])} does not match "
                             f"student_logits leading shape {tuple(student.shape[:-1])}")
        if teacher.shape[-1] < student.shape[-1]:
            raise ValueError(f"teacher_logits has vocabulary {teacher.shape[-1]} < the student's {student.shape[-1]}; "
                             "a padded teacher vocabulary may be larger (its first V columns are used), never smaller")
        if teacher.device != student.device:
            raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    leading, packed = student.shape[:-1], student.dim() == 2
    given = None if teacher is None else TeacherLogits(_contiguous_vocab(_rows_view(teacher, packed)))
    batch, source = _batch_and_teacher(
        spec, leading, student.device, "teacher_logits", given, mask=mask, token_weights=token_weights,
        positions=positions, tokens=tokens, num_items_in_batch=num_items_in_batch, teacher_logprobs=teacher_logprobs,
        rollout_logprobs=rollout_logprobs, teacher_token_logprobs=teacher_token_logprobs,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs, sequence_ids=sequence_ids,
        sequence_bounds=sequence_bounds)
    return Problem(spec, StudentLogits(_contiguous_vocab(_rows_view(student, packed))), source, batch,
                   vocab=student.shape[-1], device=student.device)


def linear(spec: LossSpec, student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
           teacher_bias=None, **per_token) -> Problem:
    hidden = tensors.float_tensor("student_hidden", student_hidden)
    if hidden.dim() not in (2, 3) or hidden.shape[-1] == 0:
        raise ValueError(f"student_hidden must have shape [B, T, H] or [N, H] with H > 0, got {tuple(hidden.shape)}")
    device = hidden.device
    weight = tensors.lm_head_weight("student_weight", student_weight, hidden.shape[-1], "student_hidden", device)
    vocab = weight.shape[0]
    bias = tensors.lm_head_bias("student_bias", student_bias, vocab, device)
    leading, packed = hidden.shape[:-1], hidden.dim() == 2
    given = None
    if teacher_hidden is None:
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("teacher_weight and teacher_bias need teacher_hidden (None only with teacher_logprobs or "
                             "a top-k teacher)")
    else:
        t_hidden = tensors.float_tensor("teacher_hidden", teacher_hidden)
        if t_hidden.shape[:-1] != leading or t_hidden.dim() != hidden.dim() or t_hidden.shape[-1] == 0:
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(leading)} and a hidden "
                             f"size > 0, got {tuple(t_hidden.shape)}")
        if t_hidden.device != device:
            raise ValueError(f"teacher_hidden is on {t_hidden.device} but student_hidden is on {device}")
        if teacher_weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head weight [V_t, H_t])")
        t_weight = tensors.lm_head_weight("teacher_weight", teacher_weight, t_hidden.shape[-1], "teacher_hidden",
                                          device)
        if t_weight.shape[0] < vocab:
            raise ValueError(f"teacher_weight has vocabulary {t_weight.shape[0]} < the student's {vocab}; a padded "
                             "teacher vocabulary may be larger (its first V rows are used), never smaller")
        t_bias = tensors.lm_head_bias("teacher_bias", teacher_bias, t_weight.shape[0], device)
        given = TeacherLinear(_rows_view(t_hidden, packed), t_weight, t_bias)
    batch, source = _batch_and_teacher(spec, leading, device, "teacher_hidden", given, **per_token)
    return Problem(spec, StudentLinear(_rows_view(hidden, packed), weight, bias), source, batch, vocab=vocab,
                   device=device)


def _topk_teacher(spec: LossSpec, ids, logprobs, leading, device, teacher_name, teacher_given, teacher_logprobs):
    """The top-k teacher (ids int64, logprobs), or None when neither is given."""
    if ids is None and logprobs is None:
        if spec.topk_mode != "tail" or spec.topk_logprob_floor is not None or spec.topk_loss_max is not None:
            raise ValueError("topk_mode, topk_logprob_floor and topk_loss_max need teacher_topk_ids and "
                             "teacher_topk_logprobs")
        return None
    if ids is None or logprobs is None:
        raise ValueError("give teacher_topk_ids and teacher_topk_logprobs together")
    if teacher_given:
        raise ValueError(f"give {teacher_name} or teacher_topk_ids/teacher_topk_logprobs, not both")
    if teacher_logprobs is not None:
        raise ValueError("teacher_logprobs is the sampled-token form; a top-k teacher gives teacher_topk_logprobs")
    if spec.divergence == "sampled":
        raise ValueError('a top-k teacher takes divergence "forward_kl", "reverse_kl" or "jsd" ("sampled" takes '
                         "teacher_logprobs, the teacher's log-prob of the sampled token)")
    return tensors.topk_tensors(ids, logprobs, leading, device)


def _sequence_ids(spec: LossSpec, ids, positions, leading, device):
    """The sequence each token belongs to (int64), or None. With a ``sequence_group`` every token needs its
    position in its whole sequence; [B, T] input defaults to row b being sequence b on every rank."""
    if spec.sequence_group is not None and positions is None:
        raise ValueError("sequence_group needs positions: each token's position in its whole sequence (the weights "
                         "and the reduction are the whole sequence's)")
    if ids is None:
        if spec.sequence_group is None:
            return None
        if len(leading) == 1:
            raise ValueError("sequence_group on [N, ...] input needs sequence_ids: the sequence each token belongs to, "
                             "the same id on every rank")
        return torch.arange(leading[0], device=device).unsqueeze(1).expand(leading)
    if positions is None:
        raise ValueError("sequence_ids needs positions: with them, each token's place in its sequence")
    return ids.long()


def sequence_bounds_of(bounds) -> tuple[int, int]:
    """``sequence_bounds`` as (S, L), two ints >= 1, or a ValueError."""
    try:
        S, L = bounds
    except (TypeError, ValueError):
        S = L = None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (S, L)):
        raise ValueError(f"sequence_bounds must be (num_sequences, max_length), two ints >= 1: every sequence id "
                         f"< num_sequences, every position in [0, max_length); got {bounds!r}")
    return S, L


def _sequence_bounds(spec: LossSpec, bounds):
    if bounds is None:
        return None
    if spec.sequence_group is None:
        raise ValueError("sequence_bounds bounds the whole batch's layout of a sequence_group call (it spares its "
                         "host sync); without a sequence_group, pass none")
    return sequence_bounds_of(bounds)


def _num_items(spec: LossSpec, count):
    if count is None:
        return None
    if spec.reduction != "mean":
        raise ValueError(f'num_items_in_batch replaces the token count of reduction="mean", not {spec.reduction!r}')
    if isinstance(count, torch.Tensor):
        if count.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(count.shape)}")
        if count.dtype == torch.bool or count.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number, got a {count.dtype} tensor")
        return count
    return real("num_items_in_batch", count)


def _batch_and_teacher(spec: LossSpec, leading, device, teacher_name, teacher, *, mask, token_weights, positions,
                       tokens, num_items_in_batch, teacher_logprobs, rollout_logprobs, teacher_token_logprobs,
                       teacher_topk_ids=None, teacher_topk_logprobs=None, sequence_ids=None, sequence_bounds=None):
    """The checks both input forms share: the per-token tensors and the teacher source, against the spec.
    Their values: wpkl/inputs/values.py."""
    weighting = spec.weighting
    topk = _topk_teacher(spec, teacher_topk_ids, teacher_topk_logprobs, leading, device, teacher_name,
                         teacher is not None, teacher_logprobs)
    if topk is None and teacher is None:
        if spec.divergence != "sampled" or teacher_logprobs is None:
            raise ValueError(f'{teacher_name} may be None only with divergence="sampled" and teacher_logprobs')
    elif topk is None and teacher_logprobs is not None:
        raise ValueError(f"give {teacher_name} or teacher_logprobs, not both")
    if spec.divergence != "sampled" and rollout_logprobs is not None:
        raise ValueError('rollout_logprobs only applies to divergence="sampled"')
    if teacher_logprobs is not None and weighting is not None and weighting.confidence > 0:
        raise ValueError(f"Weighting(confidence=...) needs {teacher_name}: teacher_logprobs carry no confidence")

    check = tensors.per_token
    mask = check("mask", mask, leading, device, "b", "a bool")
    token_weights = check("token_weights", token_weights, leading, device, "f", "a floating-point")
    positions = check("positions", positions, leading, device, "i", "an integer")
    tokens = check("tokens", tokens, leading, device, "i", "an integer")
    sequence_ids = _sequence_ids(spec, check("sequence_ids", sequence_ids, leading, device, "i", "an integer"),
                                 positions, leading, device)
    teacher_logprobs = check("teacher_logprobs", teacher_logprobs, leading, device, "f", "a floating-point")
    rollout_logprobs = check("rollout_logprobs", rollout_logprobs, leading, device, "f", "a floating-point")
    teacher_token_logprobs = check("teacher_token_logprobs", teacher_token_logprobs, leading, device, "f",
                                   "a floating-point")
    if teacher_token_logprobs is not None and teacher_logprobs is not None:
        raise ValueError("give teacher_logprobs or teacher_token_logprobs, not both: they are the same log q(y)")
    if weighting is not None and weighting.needs_teacher_token_logprobs and teacher_token_logprobs is None \
            and teacher_logprobs is None and (tokens is None or teacher_name != "teacher_logits" or topk is not None):
        raise ValueError("Weighting(prefix_confidence=...) needs log q(y) of the sampled tokens: pass "
                         "teacher_token_logprobs (or, with teacher_logits, tokens: then it is computed from them on "
                         "the torch backends)")
    if spec.divergence == "sampled" and tokens is None:
        raise ValueError('divergence="sampled" needs tokens: the token sampled at each position')

    packed = len(leading) == 1
    if packed:
        if positions is None and spec.reduction == "seq_mean":
            raise ValueError('reduction="seq_mean" on [N, V] input needs positions (a 0 starts each sequence)')
        if positions is None and weighting is not None and weighting.position is not None:
            raise ValueError("position weighting on [N, V] input needs positions (or pass [B, T, V] logits)")
        if weighting is not None and weighting.accumulated > 0 and sequence_ids is None:
            raise ValueError("Weighting(accumulated=...) needs [B, T, V] input (or sequence_ids): it sums over each "
                             "sequence's prefix")
        if positions is None and weighting is not None and weighting.prefix_confidence is not None:
            raise ValueError("Weighting(prefix_confidence=...) on [N, V] input needs positions (or pass [B, T, V] "
                             "logits): its window looks back within each sequence")
    num_items_in_batch = _num_items(spec, num_items_in_batch)
    sequence_bounds = _sequence_bounds(spec, sequence_bounds)

    valid = mask if mask is not None else torch.ones(leading, dtype=torch.bool, device=device)

    def rows(x):
        return _rows_view(x, packed)

    batch = TokenBatch(
        valid=rows(valid), leading_shape=leading, packed=packed,
        positions=rows(None if positions is None else positions.long()), token_weights=rows(token_weights),
        tokens=rows(None if tokens is None else tokens.long()), rollout_logprobs=rows(rollout_logprobs),
        teacher_token_logprobs=rows(teacher_token_logprobs), num_items_in_batch=num_items_in_batch,
        sequence_ids=rows(sequence_ids), sequence_bounds=sequence_bounds)
    if topk is not None:
        teacher = TeacherTopK(rows(topk[0]), rows(topk[1]))
    elif teacher is None:
        teacher = TeacherLogprobs(rows(teacher_logprobs))
    return batch, teacher
