"""Several teachers of the sampled-token loss ("sampled": L_k = -a_k log p(y), wpkl.multi_teacher_loss) on the
Triton kernels, the student row read once forward and once backward for all of them:

    TritonSampledMixturePass  forward(student [B, T, V], teachers [K of SampledTeacher], valids [K, B, T], spec)
                              -> loss [K, B, T], stats [K, 4, B, T], saved; backward(saved, coef [K, B, T], out)

Forward: the student pass (triton_topk.py: ``student_pass``, the forward kernel without teacher logits) gives the
student's log-normalizer and entropy, which no teacher changes, and log p(y) = (s_y - lse) / T is gathered at the
sampled token. A teacher server's log q(y) is used as given; a teacher's logits are read once by the forward
kernel in its "sampled" specialization with that teacher in both slots, on the rows the teacher sees (its
log-normalizer, confidence and entropy; the same addresses in both slots, the second load expected to hit in
cache, not measured on a GPU; its arithmetic done twice), and log q(y) = (u_y - lse_u) / T (u_y gathered on every row, one logit each,
and used only where the teacher sees the token). Then each teacher's D, -a and L follow the
specification (wpkl/reference: ``sampled_multiplier``) on [N] tensors. D = log p(y) - log q(y) comes from two
log-normalizers here (the single-teacher kernel subtracts the logits first; a difference of fp32 roundings of
each lse, about 1e-6 at lse ~ 10).
Backward, by linearity (d L_k / d s_v = -a_k ([v = y] - p_v) / T): one "sampled" backward kernel with the
multiplier sum_k c_k (-a_k) in its stats slot; no teacher is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import sampled_multiplier
from ..spec import LossSpec
from . import common
from .common import divergence_id, kernels, launch
from .triton_pass import TritonPass, TritonSaved, forward_launch
from . import triton_topk
from .triton_topk import _stat


@dataclass(frozen=True)
class SampledTeacher:
    """One teacher of the sampled-token loss: its logits [B, T, V_t >= V] or its log q(y) [B, T] (a server's
    answer), with the call's sampled tokens [B, T] and, when given, the sampling policy's log p(y) [B, T]."""

    tokens: torch.Tensor
    rollout: torch.Tensor | None
    logits: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


def _at_tokens(x, tokens, V):
    """x [B, T, V'] at the sampled tokens [B, T] as float32 [N], gathered in x's own layout (no copy of a strided
    x): NaN where a token is out of range (the value checks report it), never a number from another column."""
    tokens = tokens.reshape(x.shape[:-1])
    in_range = (tokens >= 0) & (tokens < V)
    picked = x.gather(-1, tokens.clamp(0, max(V - 1, 0))[..., None])[..., 0].to(torch.float32)
    return torch.where(in_range, picked, float("nan")).reshape(-1)


def _teacher_pass(logits, valid_bytes, tokens, spec: LossSpec):
    """A teacher's logits (first V columns) in both slots of the "sampled" forward kernel: its stats [NUM_STATS, N]
    (log-normalizer, confidence, entropy) on the rows where ``valid_bytes`` is set."""
    k = kernels()
    B, T, V = logits.shape
    N = B * T
    loss = common.new_buffer(N, dtype=torch.float32, device=logits.device)
    stats = common.new_buffer(k.NUM_STATS, N, dtype=torch.float32, device=logits.device)
    if N > 0:
        grid, args, meta = forward_launch(logits, logits, valid_bytes, tokens.reshape(N), None, None, loss, stats,
                                          divergence_id("sampled"), spec.beta, spec.temperature)
        launch(k.token_divergence_fwd_kernel, grid, args, meta)
    return stats


def _teacher_terms(teacher: SampledTeacher, V, valid_bytes, spec: LossSpec):
    """(log q(y), confidence, teacher entropy), [N] float32 each (the last two NaN for a log q(y) teacher)."""
    if teacher.logits is None:
        log_q_y = teacher.logprobs.reshape(-1).to(torch.float32)
        unknown = torch.full_like(log_q_y, float("nan"))
        return log_q_y, unknown, unknown
    logits = teacher.logits[..., :V]
    stats = _teacher_pass(logits, valid_bytes, teacher.tokens, spec)
    log_q_y = (_at_tokens(logits, teacher.tokens, V) - stats[_stat("STAT_TEACHER_LSE")]) * (1.0 / spec.temperature)
    return log_q_y, stats[_stat("STAT_CONFIDENCE")], stats[_stat("STAT_TEACHER_ENTROPY")]


@dataclass
class SampledMixtureSaved:
    """The backward inputs: the student pass's stats and valid rows (any teacher's), the tokens, and per teacher
    its multiplier -a and rows."""

    student: torch.Tensor | None
    valid_bytes: torch.Tensor  # [N] int8: some teacher sees the token
    tokens: torch.Tensor  # [N] int64
    stats: torch.Tensor  # [NUM_STATS, N] fp32
    multipliers: torch.Tensor  # [K, N] fp32: -a_k, 0 where teacher k does not see the token
    valids: torch.Tensor  # [K, N] bool
    spec: LossSpec
    teachers: None = None  # (the fused-linear form drops and attaches ``student`` and ``teachers``)


class TritonSampledMixturePass:
    @staticmethod
    def forward(student, teachers, valids, spec: LossSpec):
        B, T, V = student.shape
        K, N = len(teachers), B * T
        valids, valid_bytes, stats = triton_topk.shared_student_pass(student, valids, K, spec)
        tokens = teachers[0].tokens.reshape(N)
        log_p_y = (_at_tokens(student, tokens, V) - stats[_stat("STAT_STUDENT_LSE")]) * (1.0 / spec.temperature)
        rollout = teachers[0].rollout
        behaviour = log_p_y if rollout is None else rollout.reshape(N).to(torch.float32)
        losses, publics, multipliers = [], [], []
        for teacher, valid in zip(teachers, valids, strict=True):
            log_q_y, confidence, teacher_entropy = _teacher_terms(teacher, V, valid.to(torch.int8), spec)
            multiplier = torch.where(valid, sampled_multiplier(behaviour, log_q_y, spec.sampled_power), 0.0)
            public = torch.stack([behaviour - log_q_y, confidence, stats[_stat("STAT_STUDENT_ENTROPY")],
                                  teacher_entropy])
            losses.append(torch.where(valid, multiplier * log_p_y, 0.0))
            publics.append(torch.where(valid, public, 0.0))
            multipliers.append(multiplier)
        saved = SampledMixtureSaved(student, valid_bytes, tokens, stats, torch.stack(multipliers).to(torch.float32),
                                    valids, spec)
        return (torch.stack(losses).to(torch.float32).view(K, B, T),
                torch.stack(publics).to(torch.float32).view(K, 4, B, T), saved)

    @staticmethod
    def backward(saved: SampledMixtureSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, T, _ = saved.student.shape
        K, N = saved.valids.shape
        c = torch.where(saved.valids, coef.reshape(K, N).to(torch.float32), 0.0)
        stats = saved.stats.clone()
        stats[_stat("STAT_AUX")] = (c * saved.multipliers).sum(0)  # sum_k c_k (-a_k): the kernel's multiplier
        one = TritonSaved(saved.student, None, saved.valid_bytes, saved.tokens, stats, divergence_id("sampled"),
                          saved.spec)
        return TritonPass.backward(one, saved.valid_bytes.to(torch.float32).view(B, T), out)
