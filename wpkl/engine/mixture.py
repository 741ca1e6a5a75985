"""Several teachers' per-token terms (wpkl.multi_teacher_loss): on the plan ``mixture_route`` gives (route.py), each
group of teachers shares one pass that reads the student row once (the fused-linear form: projects each chunk of
the student's logits once), through the engine's one autograd Function (terms.py: ``TokenDivergence``):

    "logits"   MixtureAdapter, TritonMixturePass (kernels/token_mixture.py), up to MAX_TEACHERS teachers (jsd:
               MAX_JSD_TEACHERS)
    "top-k"    MixtureAdapter, TritonTopKMixturePass (wpkl/backends/triton_topk.py), any number
    "sampled"  MixtureAdapter, TritonSampledMixturePass (wpkl/backends/triton_sampled.py): logits and log q(y)
               teachers of the sampled-token loss, any number
    "logits+top-k"  MixtureAdapter, TritonLogitsTopKPass (wpkl/backends/triton_logits_topk.py): a launch of logits
               teachers and every top-k teacher of their specification ("hidden+top-k": LinearMixtureAdapter)
    "shards"   MixtureAdapter, ShardedMixturePass (wpkl/parallel/shard_mixture.py): logits teachers on vocabulary
               shards, any number, one merge of their statistics (LinearMixtureAdapter: hidden-state teachers,
               one merge per chunk); "shards-sampled" ShardedSampledMixturePass the same for the sampled-token
               loss's teachers (a merge per form of teacher); "shards-top-k" ShardedTopKMixturePass
               (wpkl/parallel/shard_topk.py) top-k teachers, any number, one merge and one gather of their atoms;
               "shards+top-k" ShardedMixturePass with top-k teachers beside the logits (hidden-state) ones
    "hidden"   and the top-k and log q(y) teachers of the fused-linear form: LinearMixtureAdapter (two-phase
               schedule as linear.py's)

every other teacher on its own route.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch

from ..backends.projection import projection_dtype
from ..backends.triton_logits_topk import TritonLogitsTopKPass
from ..backends.triton_mixture import TritonMixturePass
from ..backends.triton_sampled import SampledTeacher, TritonSampledMixturePass
from ..backends.triton_topk import TritonTopKMixturePass
from ..inputs.data import Problem, TeacherLinear
from ..parallel.shard_mixture import ShardedMixturePass, ShardedSampledMixturePass
from ..parallel.shard_topk import ShardedTopKMixturePass
from ..reference import TokenTerms, TopK
from .chunks import chunk_size_for, plan_chunks, weights_context
from .linear import _Grads, _Projector, linear_terms, logits_grad
from .route import MixturePlan, Route
from .terms import TokenDivergence, logits_terms


def _rows_of(x, rows):
    """The flattened ``rows`` of a [N, ...] tensor as [1, n, ...] (None stays None); all of it when rows is None."""
    return x if x is None or rows is None else x[rows][None]


def _top_k(tensors, rows=None):
    """TopK teachers from their (ids, log q) tensors."""
    pairs = zip(tensors[0::2], tensors[1::2], strict=True)
    return [TopK(_rows_of(i, rows), _rows_of(q, rows)) for i, q in pairs]


def _logits_and_top_k(tensors):
    """Logits teachers (floating tensors), then top-k teachers from their (ids, log q) tensors."""
    first = next((i for i, t in enumerate(tensors) if not t.is_floating_point()), len(tensors))
    return list(tensors[:first]) + _top_k(tensors[first:])


def _sampled(tensors, rows=None):
    """SampledTeacher teachers from (tokens, rollout log p(y) or None, then each teacher's logits or log q(y))."""
    tokens, rollout, *teachers = (_rows_of(x, rows) for x in tensors)
    return [SampledTeacher(tokens, rollout, *((t, None) if t.dim() == tokens.dim() + 1 else (None, t)))
            for t in teachers]


# A shared pass's form: (its pass, the teachers from the tensors after the student's and the valids; None: the
# tensors are the teachers' logits). The student-only forms project only the student's chunk (fused-linear).
# "shards": a pass built on the call's vocabulary shard.
_FORMS = {"logits": (TritonMixturePass, None), "top-k": (TritonTopKMixturePass, _top_k),
          "sampled": (TritonSampledMixturePass, _sampled), "shards": (ShardedMixturePass, None),
          "shards-sampled": (ShardedSampledMixturePass, _sampled), "shards-top-k": (ShardedTopKMixturePass, _top_k),
          "shards+top-k": (ShardedMixturePass, _logits_and_top_k),
          "logits+top-k": (TritonLogitsTopKPass, _logits_and_top_k)}


class MixtureAdapter:
    """Materialized logits. tensors: (student logits, valids [K, B, T], then the form's: each teacher's logits;
    with "top-k" each teacher's ids and log q; with "sampled" the tokens, the rollout log p(y) (or None), then
    each teacher's logits or log q(y))."""

    def __init__(self, problem: Problem, form: str):
        self.spec = problem.spec
        self.passes, self.teachers = _FORMS[form]
        if form.startswith("shards"):
            self.passes = self.passes(problem.shard)

    def forward(self, tensors, needs_grad):
        student, valids, *rest = tensors
        self.count = len(tensors)
        teachers = rest if self.teachers is None else self.teachers(rest)
        loss, stats, saved = self.passes.forward(student, teachers, valids, self.spec)
        return loss, stats, saved, ()

    def backward(self, saved, saved_tensors, grad_loss):
        out = self.passes.backward(saved, grad_loss, torch.empty_like(saved.student))
        return (out, *(None,) * (self.count - 1))


class LinearMixtureAdapter:
    """The fused-linear form. tensors: (h_s, w_s, b_s, valids [K, N], then the form's: each teacher's h_t, w_t, b_t
    ("hidden"); each teacher's ids and log q ("top-k"); both, the hidden-state teachers first ("hidden+top-k");
    the tokens, the rollout log p(y) (or None), then each
    teacher's h_t, w_t, b_t or its log q(y), None, None ("sampled")), over the flattened tokens. The student's
    chunk is projected once for all; a hidden-state teacher's chunk once, for its own pass."""

    def __init__(self, group: list[Problem], chunks, form: str):
        problem = group[0]
        self.spec, self.options, self.chunks, self.count, self.form = (problem.spec, problem.spec.linear, chunks,
                                                                        len(group), form)
        self.heads = [p.spec.linear for p in group]  # each teacher's projection options (its own teacher_ ones)
        self.passes = _FORMS[form.replace("hidden", "logits")][0]
        self.shard = problem.shard  # ("shards": hidden-state teachers on vocabulary shards, one merge per chunk)
        if form.startswith("shards"):  # the one-device form's tensors and chunks, the sharded pass
            self.passes = self.passes(problem.shard)
            self.form = {"shards": "hidden", "shards-sampled": "sampled", "shards-top-k": "top-k",
                         "shards+top-k": "hidden+top-k"}[form]
        self.projected = sum(isinstance(p.teacher, TeacherLinear) for p in group) if self.form == "hidden+top-k" \
            else None

    def _heads(self, tensors):
        """Each teacher's (h_t, w_t, b_t) ("hidden", "sampled", "hidden+top-k"'s first; w_t None for a log q(y)
        teacher)."""
        first = {"hidden": 4, "sampled": 6, "hidden+top-k": 4}.get(self.form)
        last = len(tensors) if self.projected is None else 4 + 3 * self.projected
        return [] if first is None else [tensors[i: i + 3] for i in range(first, last, 3)]

    def _dtypes(self, tensors):
        return [projection_dtype(tensors[0])] + [None if w is None else projection_dtype(h)
                                                 for h, w, _ in self._heads(tensors)]

    def _projectors(self, tensors, dtypes):
        """The student's projector, then each teacher's (None for a teacher without a head), sharing its
        student (its cast weight)."""
        first = _Projector(self.options, (dtypes[0], None), *tensors[:3], None, None, None)
        if self.form == "top-k":
            return [first]
        heads = self._heads(tensors)
        return [first] + [None if head[1] is None else _teacher_of(first, options, dtype, head)
                          for options, dtype, head in zip(self.heads[: len(heads)], dtypes[1:], heads, strict=True)]

    def _chunk(self, projectors, ids, tensors, backward=False):
        """The chunk's student logits and its teachers (backward: a top-k or sampled pass needs only the
        student's)."""
        s = projectors[0].student(ids)
        if self.form in ("hidden", "hidden+top-k"):  # (backward: the hidden-state teachers' logits again)
            teachers = [p.teacher(ids)[None] for p in projectors[1:]]
            if self.form == "hidden+top-k" and not backward:
                teachers += _top_k(tensors[4 + 3 * self.projected:], ids)
            return s, teachers
        if backward:
            return s, None
        if self.form == "top-k":
            return s, _top_k(tensors[4:], ids)
        tokens, rollout = (_rows_of(x, ids) for x in tensors[4:6])
        return s, [SampledTeacher(tokens, rollout, logits=p.teacher(ids)[None]) if p is not None else
                   SampledTeacher(tokens, rollout, logprobs=_rows_of(head[0], ids))
                   for p, head in zip(projectors[1:], self._heads(tensors), strict=True)]

    def forward(self, tensors, needs_grad):
        h_s, valids = tensors[0], tensors[3]
        dtypes = self._dtypes(tensors)
        N, K = h_s.shape[0], self.count
        loss = h_s.new_zeros(K, N, dtype=torch.float32)
        stats = h_s.new_zeros(K, 4, N, dtype=torch.float32)
        kept = []
        with torch.autocast(h_s.device.type, enabled=False):  # (linear.py: the projections choose their precision)
            projectors = self._projectors(tensors, dtypes)
            for ids in self.chunks:
                s, teachers = self._chunk(projectors, ids, tensors)
                loss_c, stats_c, saved = self.passes.forward(s[None], teachers, valids[:, ids][:, None], self.spec)
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
                s, teachers = self._chunk(projectors, ids, tensors, backward=True)
                saved = dataclasses.replace(kept, student=s[None], teachers=teachers)
                grads.add(logits_grad(self.options, s, grad_loss[:, ids].float(), None,
                                      lambda c, out, saved=saved: self.passes.backward(saved, c[:, None], out)),
                          ids, projectors[0])
                del s, teachers, saved
        return (*grads.finish(None, self.shard), None, *(None,) * (len(tensors) - 4))


def _teacher_of(first: _Projector, options, dtype, head) -> _Projector:
    """A projector sharing ``first``'s student (its cast weight), projecting a teacher's head with its options."""
    teacher = copy.copy(first)
    teacher.options = options  # (the student's options are the call's: the same in every teacher's)
    return teacher.set_teacher(dtype, *head)


def _teacher_tensors(problem: Problem, flat) -> list:
    """A teacher's tensors in its form's layout (MixtureAdapter, LinearMixtureAdapter)."""
    teacher = problem.teacher
    if isinstance(teacher, TopK):
        return [flat(teacher.ids), flat(teacher.logprobs)]
    if problem.teacher_logprobs is not None:  # (the fused-linear form: in a head's three slots)
        return [flat(problem.teacher_logprobs)] + ([None, None] if problem.linear else [])
    if problem.teacher_logits is not None:
        return [problem.teacher_logits]
    return [flat(teacher.hidden), teacher.weight, teacher.bias]


def _shared_tensors(form: str, problem: Problem, flat) -> list:
    """The form's tensors before the teachers': the sampled tokens and the rollout log p(y)."""
    batch = problem.batch
    return [flat(batch.tokens), flat(batch.rollout_logprobs)] if form in ("sampled", "shards-sampled") else []


def _linear_group(group: list[Problem], form: str) -> list[TokenTerms]:
    first = group[0]
    student, batch = first.student, first.batch
    B, T = batch.valid.shape
    valids = torch.stack([p.batch.valid for p in group])
    heads = sum(isinstance(p.teacher, TeacherLinear) for p in group)  # teachers projected with the student
    chunk = first.spec.linear.chunk_size or chunk_size_for(first.vocab, student.hidden.shape[-1], "triton",
                                                           teachers=max(heads, 1))
    chunks = plan_chunks(valids.any(0), chunk, whole_rows=False)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:])

    teachers = _shared_tensors(form, first, flat) + [x for p in group for x in _teacher_tensors(p, flat)]
    loss, stats = TokenDivergence.apply(LinearMixtureAdapter(group, chunks, form), flat(student.hidden),
                                        student.weight, student.bias, valids.reshape(len(group), B * T), *teachers)
    return [TokenTerms(loss[k].view(B, T), *stats[k].view(4, B, T).unbind(0)) for k in range(len(group))]


def _logits_group(group: list[Problem], form: str) -> list[TokenTerms]:
    valids = torch.stack([p.batch.valid for p in group])
    teachers = _shared_tensors(form, group[0], lambda x: x) + [x for p in group for x in _teacher_tensors(p, lambda x: x)]
    loss, stats = TokenDivergence.apply(MixtureAdapter(group[0], form), group[0].student.logits, valids, *teachers)
    return [TokenTerms(loss[k], *stats[k].unbind(0)) for k in range(len(group))]


def mixture_terms(problems: list[Problem], routes: list[Route], plan: MixturePlan | None) -> list[TokenTerms]:
    """Each teacher's [B, T] terms, in the teachers' order: each group of the plan through its shared pass, every
    other teacher alone."""
    alone = linear_terms if problems[0].linear else logits_terms
    terms: list = [None] * len(problems)
    for form, members in () if plan is None else plan.groups:
        group = [problems[k] for k in members]
        run = _linear_group if group[0].linear else _logits_group
        for k, one in zip(members, run(group, form), strict=True):
            terms[k] = one
    return [one if one is not None else alone(problem, own)
            for one, problem, own in zip(terms, problems, routes, strict=True)]
