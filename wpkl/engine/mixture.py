"""Several teachers' per-token terms (wpkl.multi_teacher_loss): on the route ``mixture_route`` gives (route.py), the
student row is read once for each group of up to MAX_TEACHERS teachers, through the engine's one autograd Function
(terms.py: ``TokenDivergence``) with ``MixtureAdapter`` (materialized logits) or ``LinearMixtureAdapter`` (the
fused-linear form: per chunk the student's logits are projected once for the group, two-phase schedule as
linear.py's); otherwise each teacher runs its own route.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from ..backends.projection import projection_dtype
from ..backends.triton_mixture import MAX_TEACHERS, TritonMixturePass
from ..inputs.data import Problem
from ..reference import TokenTerms
from .chunks import chunk_size_for, plan_chunks, weights_context
from .linear import _Grads, _Projector, linear_terms, logits_grad
from .route import Route
from .terms import TokenDivergence, logits_terms


class MixtureAdapter:
    """tensors: (student logits, valids [K, B, T], teacher logits 1..K)."""

    def __init__(self, problem: Problem):
        self.spec = problem.spec

    def forward(self, tensors, needs_grad):
        student, valids, *teachers = tensors
        loss, stats, saved = TritonMixturePass.forward(student, teachers, valids, self.spec)
        return loss, stats, saved, ()

    def backward(self, saved, saved_tensors, grad_loss):
        out = TritonMixturePass.backward(saved, grad_loss, torch.empty_like(saved.student))
        return (out, None, *(None,) * len(saved.teachers))


class LinearMixtureAdapter:
    """tensors: (h_s, w_s, b_s, valids [K, N], then each teacher's h_t, w_t, b_t), over the flattened tokens."""

    def __init__(self, problem: Problem, chunks, count: int):
        self.spec, self.options, self.chunks, self.count = problem.spec, problem.spec.linear, chunks, count

    def _projectors(self, tensors, dtypes):
        first = _Projector(self.options, dtypes[:2], *tensors[:3], *tensors[4:7])
        return [first] + [_teacher_of(first, dtypes[k + 1], tensors[4 + 3 * k: 7 + 3 * k]) for k in range(1, self.count)]

    def _chunk(self, projectors, ids):
        return projectors[0].student(ids), [p.teacher(ids)[None] for p in projectors]

    def forward(self, tensors, needs_grad):
        h_s, valids = tensors[0], tensors[3]
        dtypes = [projection_dtype(h_s)] + [projection_dtype(h) for h in tensors[4::3]]
        N, K = h_s.shape[0], self.count
        loss = h_s.new_zeros(K, N, dtype=torch.float32)
        stats = h_s.new_zeros(K, 4, N, dtype=torch.float32)
        kept = []
        with torch.autocast(h_s.device.type, enabled=False):  # (linear.py: the projections choose their precision)
            projectors = self._projectors(tensors, dtypes)
            for ids in self.chunks:
                s, teachers = self._chunk(projectors, ids)
                loss_c, stats_c, saved = TritonMixturePass.forward(s[None], teachers, valids[:, ids][:, None],
                                                                   self.spec)
                loss[:, ids], stats[:, :, ids] = loss_c[:, 0], stats_c[:, :, 0]
                kept.append(dataclasses.replace(saved, student=None, teachers=None))
                del s, teachers, saved
        state = dict(dtypes=dtypes, context=weights_context(), needs_grad=needs_grad[:3], kept=kept)
        return loss, stats, state, tuple(tensors)

    def backward(self, state, saved_tensors, grad_loss):
        tensors = saved_tensors
        grads = _Grads.new(*tensors[:3], state["needs_grad"])
        gather = contextlib.nullcontext() if state["context"] is None else state["context"]()
        with gather, torch.autocast(tensors[0].device.type, enabled=False):
            projectors = self._projectors(tensors, state["dtypes"])
            for ids, kept in zip(self.chunks, state["kept"], strict=True):
                s, teachers = self._chunk(projectors, ids)
                saved = dataclasses.replace(kept, student=s[None], teachers=teachers)
                grads.add(logits_grad(self.options, s, grad_loss[:, ids].float(), None,
                                      lambda c, out, saved=saved: TritonMixturePass.backward(saved, c[:, None], out)),
                          ids, projectors[0])
                del s, teachers, saved
        return (*grads.finish(None), None, *(None,) * (3 * self.count))


def _teacher_of(first: _Projector, dtype, teacher) -> _Projector:
    """A projector sharing ``first``'s student (its cast weight) with another teacher."""
    return copy.copy(first).set_teacher(dtype, *teacher)


def _linear_group(group: list[Problem]) -> list[TokenTerms]:
    first = group[0]
    student, batch = first.student, first.batch
    B, T = batch.valid.shape
    valids = torch.stack([p.batch.valid for p in group])
    chunk = first.spec.linear.chunk_size or chunk_size_for(first.vocab, student.hidden.shape[-1], "triton",
                                                           teachers=len(group))
    chunks = plan_chunks(valids.any(0), chunk, whole_rows=False)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:])

    teachers = [x for p in group for x in (flat(p.teacher.hidden), p.teacher.weight, p.teacher.bias)]
    loss, stats = TokenDivergence.apply(LinearMixtureAdapter(first, chunks, len(group)), flat(student.hidden),
                                        student.weight, student.bias, valids.reshape(len(group), B * T), *teachers)
    return [TokenTerms(loss[k].view(B, T), *stats[k].view(4, B, T).unbind(0)) for k in range(len(group))]


def mixture_terms(problems: list[Problem], routes: list[Route], shared: Route | None) -> list[TokenTerms]:
    """Each teacher's [B, T] terms: by groups through the mixture pass on the ``shared`` route, else each alone."""
    alone = linear_terms if problems[0].linear else logits_terms
    if shared is None:
        return [alone(problem, own) for problem, own in zip(problems, routes, strict=True)]
    terms = []
    for first in range(0, len(problems), MAX_TEACHERS):
        group = problems[first: first + MAX_TEACHERS]
        if len(group) == 1:
            terms.append(alone(group[0], routes[first]))
        elif group[0].linear:
            terms += _linear_group(group)
        else:
            valids = torch.stack([p.batch.valid for p in group])
            loss, stats = TokenDivergence.apply(MixtureAdapter(group[0]), group[0].student.logits, valids,
                                                *(p.teacher_logits for p in group))
            terms += [TokenTerms(loss[k], *stats[k].unbind(0)) for k in range(len(group))]
    return terms
