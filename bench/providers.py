"""Providers: ways to compute the same loss on the same inputs.

    wpkl        the fused Triton kernels (CUDA only; on CPU the interpreter only smoke-tests correctness)
    wpkl-torch  wpkl's chunked pure-torch path
    eager       the straightforward torch a trainer writes today: log_softmax of both, elementwise KL,
                weights, masked mean
    compiled    the same function under torch.compile
    trl         TRL's eager losses: GKDTrainer.generalized_jsd_loss(beta=1) for reverse KL, and
                IWOPDTrainer's sampled-token IW-OPD loss (no equivalent of the combined weighting)
    liger       Liger-Kernel's LigerJSD(beta=1) (reverse KL) fed log-probs, as its users must (CUDA only;
                uniform weighting only)
"""

from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Callable

import torch

import wpkl

from .cases import GAMMA, HALF_LIFE, Case, Inputs, case_teachers

PROVIDERS = ("wpkl", "wpkl-torch", "eager", "compiled", "trl", "liger")


def eager_topk_loss(student, topk_ids, topk_logprobs, mask):
    """What a trainer writes for a teacher server's top-k answer (TRL's IW-OPD sparse loss): the student's
    log_softmax gathered at the teacher's ids, a tail atom on both sides, forward KL over the atoms, masked mean."""
    log_p = torch.log_softmax(student.float(), dim=-1).gather(-1, topk_ids)
    log_q = topk_logprobs

    def with_tail(x):
        mass = torch.logsumexp(x, dim=-1, keepdim=True).clamp(max=-1e-7)
        return torch.cat([x, torch.log(-torch.expm1(mass))], dim=-1)

    log_p, log_q = with_tail(log_p), with_tail(log_q)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    valid = mask.float()
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def eager_forward_kl(student, teacher, mask):
    """Forward KL over the full vocabulary, masked mean (a logits teacher beside top-k ones: mopd_logits_topk)."""
    log_p = torch.log_softmax(student.float(), dim=-1)
    log_q = torch.log_softmax(teacher.float(), dim=-1)
    valid = mask.float()
    return ((log_q.exp() * (log_q - log_p)).sum(-1) * valid).sum() / valid.sum().clamp_min(1)


def _mopd_term(log_p, log_q, case_name: str, tokens):
    """One teacher's per-token loss in a multi-teacher case, as a trainer writes it."""
    p = log_p.exp()
    if case_name == "mopd":  # reverse KL
        return (p * (log_p - log_q)).sum(-1)
    if case_name == "mopd_jsd":  # beta 1/2: m = (p + q) / 2
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * (log_q.exp() * (log_q - log_m)).sum(-1) + 0.5 * (p * (log_p - log_m)).sum(-1)
    log_p_y = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # sampled: -a log p(y), -a = log p(y) - log q(y)
    log_q_y = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (log_p_y - log_q_y).detach() * log_p_y


def eager_loss(student, teacher, mask, tokens, case_name: str, second_teacher=None):
    """What a trainer writes without wpkl, weighted the same way as the case."""
    log_p = torch.log_softmax(student.float(), dim=-1)
    log_q = torch.log_softmax(teacher.float(), dim=-1)
    valid = mask.float()
    n_valid = valid.sum().clamp_min(1)
    if case_name == "power_opd":  # the powered advantage a = q(y)^5 - p(y)^5, the loss -a log p(y)
        log_p_y = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        log_q_y = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        advantage = ((log_q_y * 5).exp() - (log_p_y.detach() * 5).exp()) * valid
        return (-advantage * log_p_y).sum() / n_valid
    if case_name in ("mopd", "mopd_jsd", "mopd_sampled"):  # 1/2 each of two teachers' per-token losses
        log_q2 = torch.log_softmax(second_teacher.float(), dim=-1)
        loss = 0.5 * _mopd_term(log_p, log_q, case_name, tokens) + 0.5 * _mopd_term(log_p, log_q2, case_name, tokens)
        return (loss * valid).sum() / n_valid
    if case_name == "tip":  # the half of the valid tokens with the highest score h + d - h d (min-max scaled)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)
        valid_b = mask.bool()

        def minmax(x):
            lo = torch.where(valid_b, x, float("inf")).amin()
            span = torch.where(valid_b, x, float("-inf")).amax() - lo
            return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)

        h, d = minmax(-(p * log_p).sum(-1).detach()), minmax(kl.detach().abs())
        score = torch.where(valid_b, h + d - h * d, float("-inf")).reshape(-1)
        k = torch.ceil(0.5 * valid_b.sum().double() - 1e-9).long().clamp(min=1)
        threshold = score.sort(descending=True).values.gather(0, (k - 1).reshape(1))
        keep = (valid_b.reshape(-1) & (score >= threshold)).reshape(kl.shape).float()
        return (keep * kl).sum() / n_valid
    if case_name == "iw_opd":
        log_p_y = log_p.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        log_q_y = log_q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        advantage = ((log_q_y - log_p_y) * valid).detach()
        abs_adv = advantage.abs()
        prefix = abs_adv.cumsum(dim=1) - abs_adv
        weight = 1 + GAMMA * (1 - prefix / abs_adv.sum(dim=1, keepdim=True).clamp_min(1e-8))
        return (-log_p_y * weight * advantage * valid).sum() / n_valid
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    weight = valid
    if case_name == "combined":
        position = mask.long().cumsum(dim=1) - mask.long()
        confidence = log_q.max(dim=-1).values.exp()
        weight = weight * torch.exp2(-position / HALF_LIFE) * confidence * kl.detach().abs()
        weight = weight * (n_valid / weight.sum())
    return (weight.detach() * kl).sum() / n_valid


_compiled = {}


def _compiled_loss(backward: bool):
    # Dynamic over shapes so the sweep does not recompile per shape. Dynamo still specializes per case and
    # grad mode (and dtype); raise its recompile limit so that it never silently falls back to eager.
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    if backward not in _compiled:
        _compiled[backward] = torch.compile(eager_loss, dynamic=True)
    return _compiled[backward]


_compiled_topk_fns = {}


def _compiled_topk(backward: bool, fn=eager_topk_loss):
    if (backward, fn) not in _compiled_topk_fns:
        _compiled_loss(backward)  # the recompile limits
        _compiled_topk_fns[backward, fn] = torch.compile(fn, dynamic=True)
    return _compiled_topk_fns[backward, fn]


def _trl_iw_opd(student, teacher, labels, tokens):
    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    trainer = SimpleNamespace(temperature=1.0, iw_opd_gamma=GAMMA, iw_opd_epsilon=1e-8,
                              model=SimpleNamespace(training=True), _metrics=defaultdict(lambda: defaultdict(list)))
    # As IWOPDTrainer.compute_loss does: the teacher's log-probabilities of the sampled tokens first.
    teacher_logprobs = torch.log_softmax(teacher, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return IWOPDTrainer._compute_iw_opd_loss(trainer, student_logits=student, completion_tokens=tokens,
                                             labels=labels, teacher_actual_logprobs=teacher_logprobs)


def unavailable(provider: str, case: Case, device: str) -> str | None:
    """Why a provider cannot run this case here, or None."""
    if provider == "wpkl" and device != "cuda":
        return "Triton kernels need a CUDA GPU (CPU runs only the interpreter's correctness smoke)"
    if provider == "trl":
        if importlib.util.find_spec("trl") is None:
            return "trl is not installed"
        if case.name == "combined":
            return "TRL has no position x confidence x disagreement weighting"
        if case.name in ("power_opd", "tip") or case.teachers > 1:
            return "TRL has no PowerOPD, TIP or multi-teacher loss"
        if case.topk:
            return "TRL's server top-k loss is a method of a trainer with a teacher client; eager restates it"
    if provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if device != "cuda":
            return "Liger-Kernel needs a CUDA GPU"
        if case.name != "uniform":
            return "Liger-Kernel has no weighted, sampled-token or top-k loss"
    return None


def build(provider: str, case: Case, inputs: Inputs, backward: bool) -> Callable[[], torch.Tensor]:
    """A zero-argument function computing the case's loss with this provider."""
    s, t, mask, tokens = inputs.student, inputs.teacher, inputs.mask, inputs.tokens
    if case.topk:
        teachers = case_teachers(case, inputs)  # made before timing: inputs, not costs
        lists = [(t["teacher_topk_ids"], t["teacher_topk_logprobs"]) for t in teachers if isinstance(t, dict)]
        if provider in ("wpkl", "wpkl-torch"):
            options = dict(mask=mask, topk_mode="tail", divergence="forward_kl",
                           backend="triton" if provider == "wpkl" else "torch")
            if case.teachers > 1:
                return lambda: wpkl.multi_teacher_loss(s, teachers=teachers, **options)
            return lambda: wpkl.weighted_kl_loss(s, None, **teachers[0], **options)
        if provider in ("eager", "compiled"):  # several teachers: 1/K each of the same masked mean
            fn = eager_topk_loss if provider == "eager" else _compiled_topk(backward)
            dense = eager_forward_kl if provider == "eager" else _compiled_topk(backward, eager_forward_kl)
            return lambda: (sum(fn(s, ids, logprobs, mask) for ids, logprobs in lists)
                            + (dense(s, t, mask) if case.with_logits else 0.0)) / case.teachers
    second = inputs.second_teacher() if case.teachers == 2 else None  # made before timing: an input, not a cost
    if provider in ("wpkl", "wpkl-torch"):
        backend = "triton" if provider == "wpkl" else "torch"
        if case.teachers == 2:
            return lambda: wpkl.multi_teacher_loss(s, teachers=[t, second], mask=mask, tokens=tokens,
                                                   weighting=case.weighting, divergence=case.divergence,
                                                   backend=backend, **dict(case.options))
        return lambda: wpkl.weighted_kl_loss(s, t, mask=mask, tokens=tokens, weighting=case.weighting,
                                             divergence=case.divergence, backend=backend, **dict(case.options))
    if provider == "eager":
        return lambda: eager_loss(s, t, mask, tokens, case.name, second)
    if provider == "compiled":
        fn = _compiled_loss(backward)
        return lambda: fn(s, t, mask, tokens, case.name, second)
    if provider == "trl":
        labels = inputs.labels
        if case.name == "iw_opd":
            return lambda: _trl_iw_opd(s, t, labels, tokens)
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        return lambda: GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=1.0)
    if provider == "liger":
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=1.0)
        V = s.shape[-1]
        labels = inputs.labels.reshape(-1)
        return lambda: jsd(torch.log_softmax(s, dim=-1).reshape(-1, V), torch.log_softmax(t, dim=-1).reshape(-1, V),
                           labels)
    raise ValueError(f"unknown provider {provider!r}")
