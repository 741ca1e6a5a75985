"""The route table: from a call's specification and inputs, which backend, vocabulary pass, weights and schedule
run, and why. ``route(problem)`` is the only place that decides (for several teachers, ``mixture_route`` then
decides whether one pass serves them); the engine follows the ``Route`` it returns, the cross-rank agreement
compares its ``key``, and ``str(route)`` is the one line errors and the CLI print.

    backend    "triton"   the kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
               "torch"    the chunked torch pass: any device, bounded memory
               "reference" the specification on all valid rows at once (float64-capable, for tests)
               "auto" picks triton for CUDA tensors in float32/bfloat16/float16 when Triton is installed, else torch
    terms      "fused op"        one custom op: vocabulary pass + weights kernel (materialized logits, one device)
               "kernels"         the Triton pass through the engine's autograd Function (a top-k teacher; each
                                 chunk of the fused-linear form)
               "sharded kernels" the Triton pass on a vocabulary slice, statistics merged over the group (a top-k
                                 teacher: the student's, and its atoms' logits gathered from their ranks)
               "torch pass"      the torch pass
               "mixed kernels"   several teachers sharing Triton passes (``mixture_route``: logits, hidden states,
                                 top-k or sampled-token teachers, logits and top-k ones together, logits teachers
                                 on vocabulary shards; the student read or projected once per pass)
               "reference"       the specification
    weights    "kernel" (the fused op's weights kernel) or "torch" (wpkl/engine/weigh.py)
    schedule   the fused-linear form's: "eager" (gradients during forward; with ``accumulated`` only when every
               sequence fits a chunk, else two-phase) or "two-phase"; None for materialized logits

With a ``sequence_group`` the weights need the other ranks' tokens (wpkl/parallel/sequence.py), and with
``sequence_ids`` the tokens' layout (wpkl/inputs/layout.py): they run in torch after the terms, and the
fused-linear form runs two-phase; the terms take the route they take without them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from ..backends.common import KERNEL_DTYPES
from ..backends.projection import projection_dtype
from ..backends.weights_kernel import KERNEL_WEIGHTING, WEIGHTING_FIELDS
from ..inputs.data import Problem, StudentLinear, TeacherLinear, TeacherLogits
from ..weighting import Weighting


@dataclass(frozen=True)
class Route:
    backend: str
    terms: str
    weights: str
    schedule: str | None
    inplace: bool
    reason: str

    @property
    def key(self) -> tuple:
        """What every rank of a group must share (the reason is prose, not part of it)."""
        return (self.backend, self.terms, self.weights, self.schedule, self.inplace)

    @property
    def eager(self) -> bool:
        return self.schedule == "eager"

    def __str__(self) -> str:
        parts = [f"{self.backend}: {self.terms}", f"weights in {self.weights}"]
        if self.schedule is not None:
            parts.append(f"{self.schedule} schedule")
        if self.inplace:
            parts.append("gradient in place")
        return ", ".join(parts) + f" ({self.reason})"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels_interpreted() -> bool:
    from ..kernels import token_divergence_fwd_kernel

    return type(token_divergence_fwd_kernel).__name__ == "InterpretedFunction"


def input_dtypes(problem: Problem) -> list[torch.dtype]:
    """The dtypes the vocabulary pass sees. The fused-linear form hands it float32 logits; float64 hidden states
    project to float64 logits (the torch pass only); a float64 weight with float32 hidden states projects in
    float32."""
    if isinstance(problem.student, StudentLinear):
        hidden = [problem.student.hidden] + ([problem.teacher.hidden] if isinstance(problem.teacher, TeacherLinear)
                                             else [])
        return [torch.float64 if any(x.dtype == torch.float64 for x in hidden) else torch.float32]
    teacher = problem.teacher.logits if isinstance(problem.teacher, TeacherLogits) else None
    return [x.dtype for x in (problem.student.logits, teacher) if x is not None]


def torch_only_weighting(weighting: Weighting | None) -> list[str]:
    """The weighting's set fields that the weights kernel does not implement (``prefix_confidence``)."""
    if weighting is None:
        return []
    return [name for name, default in WEIGHTING_FIELDS
            if name not in KERNEL_WEIGHTING and getattr(weighting, name) != default]


def _backend(problem: Problem) -> tuple[str, str]:
    spec, device = problem.spec, problem.device
    dtypes = input_dtypes(problem)
    kernel_dtypes = all(d in KERNEL_DTYPES for d in dtypes)
    if spec.backend == "auto":
        if device.type == "cuda" and kernel_dtypes and triton_installed():
            return "triton", "auto: CUDA tensors in a kernel dtype"
        why = ("no triton" if not triton_installed() else f"{device.type} tensors" if device.type != "cuda"
               else ", ".join(str(d) for d in dtypes))
        return "torch", f"auto: {why}"
    if spec.backend != "triton":
        return spec.backend, f"backend={spec.backend!r}"
    if not triton_installed():
        raise ValueError('backend="triton" needs the triton package (pip install triton); use backend="torch"')
    if not kernel_dtypes:
        raise ValueError(f'backend="triton" supports float32, bfloat16 and float16 logits, got '
                         f'{", ".join(str(d) for d in dtypes)}')
    if device.type == "cpu":
        if not kernels_interpreted():
            raise ValueError('backend="triton" on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 '
                             'before importing wpkl, or use backend="torch"')
    elif device.type != "cuda":
        raise ValueError(f'backend="triton" needs CUDA tensors, got {device}; use backend="torch"')
    return "triton", "backend='triton'"


def _schedule(problem: Problem, backend: str) -> str:
    """The eager schedule (wpkl/engine/linear.py) needs a scalar upstream and a compute dtype whose range holds the
    unscaled logits-gradient: float16 (GradScaler's loss scale) runs two-phase."""
    spec, student = problem.spec, problem.student
    by_ids = spec.sequence_group is not None or problem.batch.sequence_ids is not None  # whole-batch weights
    batch_weights = spec.weighting is not None and spec.weighting.needs_batch  # token_importance: the whole batch
    eager = (spec.reduction != "none" and not by_ids and not batch_weights and student.trainable and torch.is_grad_enabled() and backend != "reference"
             and projection_dtype(student.hidden) != torch.float16)
    return "eager" if eager else "two-phase"


@dataclass(frozen=True)
class MixturePlan:
    """Several teachers' passes (``mixture_route``): ``groups`` holds the teachers' indices that share one pass
    (the student row read, or its chunk projected, once for them), each with its form ("logits", "hidden",
    "top-k", "sampled", "logits+top-k", "hidden+top-k", "shards", "shards-sampled", "shards-top-k",
    "shards+top-k": wpkl/engine/mixture.py's); a
    teacher in no group runs its own route. ``route`` is the line errors and the CLI print."""

    route: Route
    groups: tuple[tuple[str, tuple[int, ...]], ...]


def _mixture_form(problem: Problem, own: Route, mixing: str) -> tuple | None:
    """The shared pass a teacher can join, as a key (its form and what the form's group must share: the
    specification, a logits dtype and an element grid), or None."""
    from ..backends.triton_mixture import element_grid

    spec = problem.spec
    if own.terms == "sharded kernels" and problem.teacher_topk is not None:
        return ("shards-top-k", spec)  # any number, every divergence and mixing: one merge, one gather of atoms
    if own.terms == "sharded kernels":
        # logits teachers with a KL or jsd: every rank's kernels take its slice (grouped there by dtype and element
        # grid, local facts that change no collective), one merge of all their statistics (jsd: then one of its
        # second pass's sums; wpkl/parallel/shard_mixture.py);
        # hidden-state teachers (fused-linear) under dense mixing, as on one device: one merge per chunk
        hidden = isinstance(problem.teacher, TeacherLinear) and mixing == "dense"
        if spec.exact_divergence == "sampled":  # logits, log q(y) and (dense) hidden-state teachers, every mixing
            if isinstance(problem.teacher, TeacherLinear) and not hidden:
                return None
            return ("shards-sampled", spec if spec.linear is None else spec.replace(teacher_logit_scale=1.0,
                                                                                    teacher_softcap=None))
        if not (hidden or (problem.teacher_logits is not None and not problem.linear)) or mixing == "routing" or \
                spec.exact_divergence not in ("reverse_kl", "forward_kl", "jsd"):
            return None
        return ("shards", spec)
    if own.backend != "triton" or own.terms != "kernels":
        return None  # the kernels' route of one device
    if problem.teacher_topk is not None:
        # every divergence (the atom math is the specification's, on [N, k] atoms), and every mixing: the shared
        # pass does no teacher's work per element (one student pass, one dense backward)
        return ("top-k", spec)
    if spec.exact_divergence == "sampled":
        # log q(y) and logits teachers, every mixing: one student pass, each teacher's row read once (on its own
        # tokens) by its own pass, one dense backward (no teacher's work per element there); hidden-state teachers
        # when dense (as for "hidden" below: each projected on every token of the shared chunks)
        # (the teachers' projection options are each teacher's own: LinearMixtureAdapter projects each with its own)
        if isinstance(problem.teacher, TeacherLinear) and mixing != "dense":
            return None
        return ("sampled", spec if spec.linear is None else spec.replace(teacher_logit_scale=1.0, teacher_softcap=None))
    if spec.exact_divergence not in ("reverse_kl", "forward_kl", "jsd") or mixing == "routing":
        return None
    if isinstance(problem.teacher, TeacherLinear):
        # each teacher projected on every token of the shared chunks: for numbers, or a tensor the host saw is dense
        return ("hidden", spec) if mixing == "dense" else None
    teacher = problem.teacher_logits
    if teacher is None or problem.linear:
        return None
    return ("logits", spec, teacher.dtype, element_grid(teacher))


def mixture_route(problems: list[Problem], routes: list[Route], mixing: str = "dense") -> MixturePlan | None:
    """Several teachers (wpkl.multi_teacher_loss), after each teacher's own route: which of them share one pass
    that reads the student row once (or, fused-linear, projects the student's chunk once), or None (each teacher
    its own pass). Teachers group by form and specification: logits of one dtype lying whole elements apart or
    hidden states and a weight, up to MAX_TEACHERS per pass with reverse or forward KL (MAX_JSD_TEACHERS with jsd)
    (wpkl/backends/triton_mixture.py); top-k teachers, any number, every divergence
    (wpkl/backends/triton_topk.py); the sampled-token loss's logits and log q(y) teachers, any number
    (wpkl/backends/triton_sampled.py), each on the kernels' route of one device; top-k teachers beside logits (or
    hidden-state) teachers of their specification join the first launch of those (wpkl/backends/triton_logits_topk.py:
    one student read for both forms); on vocabulary shards, the logits teachers with reverse or forward KL or jsd,
    any number (in launches of the kernel's slots), their statistics merged at once (wpkl/parallel/shard_mixture.py),
    (dense mixing) hidden-state teachers, one merge per chunk, the sampled-token loss's teachers, and top-k
    teachers (one merge of the student's statistics, one gather of their atoms: wpkl/parallel/shard_topk.py),
    beside logits or hidden-state teachers of their specification in the first launch of those (one student read
    for both forms). The plan joins the ranks' agreement (wpkl/parallel/agree.py): it decides the collectives.

    ``mixing`` (wpkl/api/variants.py: ``_mixing_kind``): "dense" (numbers, or a host tensor with tokens of
    several teachers), "routing" (a host tensor, one teacher per token: each logits or hidden-state teacher's own
    pass reads each row once in all and does one teacher's work per element, where the shared kernel would do
    every teacher's) or "device" (a tensor not read on the host: logits teachers share, the same bytes with
    K-wide arithmetic; hidden-state teachers do not, whose shared chunks would project every teacher on every
    token)."""
    from ..backends.triton_mixture import max_teachers

    if len(problems) < 2:
        return None
    forms: dict[tuple, list[int]] = {}
    for k, (problem, own) in enumerate(zip(problems, routes, strict=True)):
        form = _mixture_form(problem, own, mixing)
        if form is not None:
            forms.setdefault(form, []).append(k)
    groups = []
    for form, members in list(forms.items()):
        # top-k teachers with logits teachers of their specification: one pass for the first launch of those
        # (wpkl/backends/triton_logits_topk.py)
        # (on vocabulary shards: every logits or hidden-state teacher, the launches are each rank's own)
        kinds = ("shards",) if form[0] == "shards-top-k" else ("logits", "hidden")
        logits = next((key for key in forms if key[0] in kinds and key[1] == form[1] and forms[key]), None)
        if form[0] in ("top-k", "shards-top-k") and logits is not None:
            size = len(forms[logits]) if form[0] == "shards-top-k" else max_teachers(form[1])
            groups.append((f"{logits[0]}+top-k", tuple(forms[logits][:size]) + tuple(members)))
            forms[logits], forms[form] = forms[logits][size:], []
    for form, members in forms.items():
        size = len(members) if form[0] in ("top-k", "sampled", "shards", "shards-sampled", "shards-top-k") else \
            max_teachers(form[1])
        if not members:
            continue
        groups += [(form[0], tuple(members[i: i + size])) for i in range(0, len(members), size)
                   if len(members[i: i + size]) > 1]
    if not groups:
        return None
    shared = sum(len(g) for _, g in groups)
    passes = len(groups) + len(problems) - shared
    what = "projected" if problems[0].linear else "read"
    labels = {"shards": "logits or hidden-state on vocabulary shards (their statistics merged at once)",
              "shards-sampled": "sampled-token on vocabulary shards (a merge per form)",
              "shards-top-k": "top-k on vocabulary shards (one merge, one gather of their atoms)",
              "shards+top-k": "logits (or hidden-state) and top-k on vocabulary shards",
              "logits+top-k": "logits and top-k", "hidden+top-k": "hidden-state and top-k"}
    forms_line = ", ".join(f"{len(g)} {labels.get(form, form)}" for form, g in groups)
    passes_line = "1 pass" if passes == 1 else f"{passes} passes"
    return MixturePlan(Route("triton", "mixed kernels", "torch", routes[0].schedule, False,
                             f"{routes[0].reason}; {len(problems)} teachers in {passes_line}, the student {what} "
                             f"once per pass ({forms_line} teachers sharing one)"), tuple(groups))


def route(problem: Problem, mixture: bool = False) -> Route:
    """The one decision of a call (module docstring). Raises a ValueError for a backend that cannot run it.
    ``mixture``: the terms of several teachers are mixed before the weights (wpkl.multi_teacher_loss), so the
    weights run in torch on the mixture: no fused op, and the fused-linear form runs two-phase."""
    spec = problem.spec
    backend, reason = _backend(problem)
    linear = isinstance(problem.student, StudentLinear)
    schedule = ("two-phase" if mixture else _schedule(problem, backend)) if linear else None
    topk = problem.teacher_topk is not None
    if backend in ("torch", "reference"):
        terms = "torch pass" if backend == "torch" else "reference"
        return Route(backend, terms, "torch", schedule, False, reason)
    by_ids = spec.sequence_group is not None or problem.batch.sequence_ids is not None
    if by_ids and not linear and spec.process_group is None:
        # the kernels' pass without the fused op's weights kernel (as for a top-k teacher): every weighting applies
        why = "sequence shards" if spec.sequence_group is not None else "sequence_ids"
        return Route("triton", "kernels", "torch", None, spec.inplace_backward, f"{reason}; {why} weigh in torch")
    if spec.process_group is not None:
        # (a top-k teacher, every divergence: the student's statistics merged, its atoms gathered from their ranks;
        # jsd: the normalizers merged before its second pass)
        why = "vocabulary shards" + (" with a top-k teacher" if topk else "")
        return Route("triton", "sharded kernels", "torch", schedule, False, f"{reason}; {why}")
    if linear:
        return Route("triton", "kernels", "torch", schedule, False, f"{reason}; fused-linear chunks")
    inplace = spec.inplace_backward
    if topk:
        return Route("triton", "kernels", "torch", None, inplace, f"{reason}; a top-k teacher weighs in torch")
    if mixture:
        return Route("triton", "kernels", "torch", None, inplace, f"{reason}; several teachers' mixture weighs in torch")
    unsupported = torch_only_weighting(spec.weighting)
    if unsupported:  # the kernels' vocabulary pass, then the torch weights on its [N] per-token terms
        names = ", ".join(f"{name}=..." for name in unsupported)
        return Route("triton", "kernels", "torch", None, inplace, f"{reason}; Weighting({names}) weighs in torch")
    return Route("triton", "fused op", "kernel", None, inplace, reason)
