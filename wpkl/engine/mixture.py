"""Several teachers' per-token terms (wpkl.multi_teacher_loss): on the route ``mixture_route`` gives (route.py), the
student row is read once for each group of up to MAX_TEACHERS teachers' logits, through the engine's one autograd
Function (terms.py: ``TokenDivergence``) with ``MixtureAdapter``; otherwise each teacher runs its own route.
"""

from __future__ import annotations

import torch

from ..backends.triton_mixture import MAX_TEACHERS, TritonMixturePass
from ..inputs.data import Problem
from ..reference import TokenTerms
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


def mixture_terms(problems: list[Problem], routes: list[Route], shared: Route | None) -> list[TokenTerms]:
    """Each teacher's [B, T] terms: by groups through the mixture pass on the ``shared`` route, else each alone."""
    if shared is None:
        return [logits_terms(problem, own) for problem, own in zip(problems, routes, strict=True)]
    terms = []
    for first in range(0, len(problems), MAX_TEACHERS):
        group = problems[first: first + MAX_TEACHERS]
        if len(group) == 1:
            terms.append(logits_terms(group[0], routes[first]))
            continue
        valids = torch.stack([p.batch.valid for p in group])
        loss, stats = TokenDivergence.apply(MixtureAdapter(group[0]), group[0].student.logits, valids,
                                            *(p.teacher_logits for p in group))
        terms += [TokenTerms(loss[k], *stats[k].unbind(0)) for k in range(len(group))]
    return terms
