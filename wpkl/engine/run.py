"""A loss call from its specification and inputs, the same for every input form:

    build the Problem (wpkl/inputs/build.py)  ->  route it (route.py)  ->  check the values (wpkl/inputs/values.py;
    with a process group, every rank agrees first: wpkl/parallel/agree.py; with a sequence group, around that:
    wpkl/parallel/sequence.py)  ->  the per-token terms (the fused op,
    terms.py or linear.py)  ->  weights and reduction (weigh.py)

The public functions and modules (wpkl/api) call ``materialized_loss`` or ``linear_loss`` with a ``LossSpec``.
"""

from __future__ import annotations


from ..inputs import build
from ..inputs.data import Problem
from ..inputs.values import check_values
from ..spec import LossSpec
from .mixture import mixture_terms
from .route import Route, mixture_route, route
from .weigh import EagerCoefficients, mix_terms, sequences, weigh_and_reduce


def _routed(spec: LossSpec, prepare, mixture: bool = False, check=check_values,
            bounds=None, teachers=None) -> tuple[Problem, Route]:
    def prepare_and_route():
        problem = prepare()
        return problem, route(problem, mixture)

    step = prepare_and_route
    if spec.process_group is not None:
        from ..parallel.agree import agree

        def step():
            return agree(spec.process_group, prepare_and_route, check, teachers)
    if spec.sequence_group is not None:  # around the vocabulary agreement: a rank it rejects is heard here too
        from ..parallel.sequence import agree_sequences

        return agree_sequences(spec.sequence_group, step, check if spec.process_group is None else None, bounds)
    return step()


def _terms(problem: Problem, chosen: Route, seq):
    if problem.linear:
        from .linear import linear_terms

        coefficients = EagerCoefficients(problem, seq) if chosen.eager else None
        return linear_terms(problem, chosen, coefficients)
    from .terms import logits_terms

    return logits_terms(problem, chosen)


def _finish(problem: Problem, chosen: Route):
    if not problem.spec.groups:  # a grouped call checked its values in the agreement
        check_values(problem)
    seq = sequences(problem)
    return weigh_and_reduce(problem, _terms(problem, chosen, seq), seq)


def mixture_loss(spec: LossSpec, linear: bool, base: dict, teachers: list[tuple[LossSpec, dict]], mixing,
                 mixing_kind: str = "dense"):
    """Several teachers (wpkl.multi_teacher_loss): ``base`` holds the call's data (the agreement, the weights and
    the reduction see its Problem: the first teacher, the whole mask), ``teachers`` each teacher's spec (the call's,
    with the teacher's own options) and data (its mask without the tokens its mixing weight is 0 on). The
    teachers' per-token terms (mixture.py: groups of them sharing one pass where ``mixture_route`` finds them;
    ``mixing_kind`` says what the host knows of the mixing, variants.py's ``_mixing_kind``), then their mixture
    (weigh.py: ``mix_terms``), then the weights and the reduction once, on the mixture."""
    make = build.linear if linear else build.materialized
    others, routes, plan = [], [], [None]

    def prepare():
        others[:] = [make(own, **data) for own, data in teachers]
        routes[:] = [route(other, mixture=True) for other in others]  # a teacher's form picks its pass
        plan[0] = mixture_route(others, routes, mixing_kind)  # (before the agreement: it decides collectives)
        return make(spec, **base)

    def check(problem):  # inside the agreement (a rank whose teacher is rejected makes every rank raise): each
        # teacher on its own tokens (together: every valid token), with the call's shard; returns the flags
        return [check_values(one.replace(shard=problem.shard)) for one in others]

    problem, _ = _routed(spec, prepare, mixture=True, check=check, bounds=base.get("sequence_bounds"),
                         teachers=lambda: (others, routes, plan[0]))
    if not problem.spec.groups:
        check(problem)
    seq = sequences(problem)
    local = [other.replace(shard=problem.shard, sequences=problem.sequences) for other in others]

    terms = mixture_terms(local, routes, plan[0])
    return weigh_and_reduce(problem, mix_terms(terms, mixing, [other.batch.valid for other in others]), seq)


def materialized_loss(spec: LossSpec, student_logits, teacher_logits, **data):
    """``weighted_kl_loss``'s work: ``data`` holds its per-token and teacher arguments by name."""
    problem, chosen = _routed(spec, lambda: build.materialized(spec, student_logits, teacher_logits, **data),
                              bounds=data.get("sequence_bounds"))
    if chosen.terms == "fused op":
        from .fused import fused_loss

        return fused_loss(problem, chosen)  # its value checks run inside the weights kernel
    return _finish(problem, chosen)


def linear_loss(spec: LossSpec, student_hidden, student_weight, teacher_hidden, teacher_weight, **data):
    """``fused_linear_kl_loss``'s work (the lm_head weights as given: gathered by the caller when sharded)."""
    problem, chosen = _routed(spec, lambda: build.linear(spec, student_hidden, student_weight, teacher_hidden,
                                                         teacher_weight, **data),
                              bounds=data.get("sequence_bounds"))
    return _finish(problem, chosen)


def explain(problem: Problem) -> str:
    """The route a problem takes, in the one line errors and the CLI print."""
    return str(route(problem))
