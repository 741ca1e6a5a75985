"""The fused-linear form: the weighted divergence from hidden states and lm_head weights, never materializing
[N, V] logits (no tensor has more than ``chunk_size`` rows of V; chunks.py plans them and states the memory).

Per chunk of valid tokens the student (and teacher) logits are projected in float32 (wpkl/backends/projection.py:
TRL's precision convention), handed to the vocabulary pass the route names (the Triton kernels, the sharded
kernels or the torch pass), and dropped; weighting and reduction then run on [B, T] vectors exactly as for
materialized logits (weigh.py). The chain rule through the projection:

    d z / d (h W^T + b) = scale * (1 - (z / c)^2)      (z the logits after scale and softcap c; without softcap: scale)
    grad_h = G W,   grad_W = G^T h,   grad_b = sum_rows G,      G = d loss / d (h W^T + b) of the chunk

G is cast to the compute dtype before its two GEMMs and accumulated in float32 (TRL's convention). The compute
dtypes are the forward's (the autocast dtype under autocast), saved for backward.

Two schedules (the route's ``schedule``, wpkl/engine/route.py):

- **eager** (4 GEMM-equivalents of N V H with a co-located teacher: 2 projections + 2 gradient GEMMs): when every
  token's weight is known once its chunk is done and only one scalar for the whole batch remains (uniform,
  position, confidence, disagreement and token weights; ``accumulated`` when chunks hold whole sequences;
  normalization and the upstream gradient are that scalar), the gradients are computed during the forward pass
  with the per-token coefficients ``w_i * r_i`` (weigh.py: ``EagerCoefficients``), kept in float32, and scaled in
  backward (as Liger's fused-linear losses do). The scalar is recovered from the ``d loss / d L_i`` autograd hands
  backward (that scalar times the coefficients, by construction). Costs: the float32 accumulators are held from
  forward to backward, and the gradient GEMMs run even if backward never does (a grad-enabled evaluation):
  compute such losses under ``torch.no_grad()``.
- **two-phase** (6 GEMM-equivalents): otherwise: ``reduction="none"``, ``accumulated`` with a sequence longer
  than a chunk, and float16 compute (the logits-gradient is cast to the compute dtype before its GEMMs, and in
  float16 only the two-phase schedule sees the upstream gradient, e.g. GradScaler's loss scale, before that
  cast). Forward keeps each chunk's saved pass without its logits; backward recomputes both projections chunk by
  chunk (inside ``gathered_weights``'s context when one is set, for DeepSpeed ZeRO-3) and reattaches them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from ..backends.projection import accumulate_dtype, addmm_fp32, matmul_fp32, project, projection_dtype
from ..backends.torch_pass import TorchPass, TorchSaved, reference_terms
from ..inputs.data import Problem, TeacherLinear
from ..reference import TokenTerms, TopK
from .chunks import chunk_size_for, plan_chunks, weights_context
from .route import Route
from .terms import TokenDivergence, pass_for


class _Projector:
    """The per-chunk projections of both models, with the weights cast once per pass to the compute dtypes."""

    def __init__(self, options, dtypes, h_s, w_s, b_s, h_t, w_t, b_t):
        self.options, self.dtype_s = options, dtypes[0]
        self.h_s, self.b_s = h_s.detach(), None if b_s is None else b_s.detach()
        self.w_s = w_s.detach().to(self.dtype_s)  # a no-op when the weight is in the compute dtype
        self.set_teacher(dtypes[1], h_t, w_t, b_t)

    def set_teacher(self, dtype_t, h_t, w_t, b_t) -> _Projector:
        vocab = self.w_s.shape[0]
        self.dtype_t, self.h_t = dtype_t, h_t
        self.w_t = None if w_t is None else w_t.detach()[:vocab].to(dtype_t)
        self.b_t = None if b_t is None else b_t.detach()[:vocab]
        return self

    def student(self, ids):
        o = self.options
        return project(self.h_s[ids], self.w_s, self.b_s, o.student_logit_scale, o.student_softcap, self.dtype_s)

    def teacher(self, ids):
        o = self.options
        return None if self.h_t is None else project(self.h_t[ids], self.w_t, self.b_t, o.teacher_logit_scale,
                                                     o.teacher_softcap, self.dtype_t)

    def __call__(self, ids):
        return self.student(ids), self.teacher(ids)


class LinearAdapter:
    """tensors: (h_s, w_s, b_s, h_t, w_t, b_t, tokens, teacher_logprobs, rollout_logprobs, topk ids, top-k log q),
    each [N, ...] over the flattened tokens (None where absent). ``coefficients``: the eager schedule's
    (weigh.py: ``EagerCoefficients``), or None for the two-phase schedule."""

    def __init__(self, problem: Problem, route: Route, chunks, coefficients):
        self.spec, self.shard, self.route = problem.spec, problem.shard, route
        self.options = problem.spec.linear
        self.chunks, self.coefficients = chunks, coefficients
        self.passes = pass_for(route, problem.teacher_topk is not None)

    def _chunk(self, projector, ids, tensors):
        """The chunk's logits, its teacher for the pass, and its per-token inputs as [1, n] rows."""
        s, t = projector(ids)
        tokens, teacher_logprobs, rollout_logprobs, topk_ids, topk_logprobs = tensors[6:]
        if t is not None:
            source = t[None]
        elif topk_ids is not None:
            source = TopK(topk_ids[ids][None], topk_logprobs[ids][None])
        else:
            source = None
        valid = torch.ones(1, ids.numel(), dtype=torch.bool, device=s.device)
        per_token = [None if x is None else x[ids][None] for x in (tokens, teacher_logprobs, rollout_logprobs)]
        return s, t, source, valid, per_token

    def forward(self, tensors, needs_grad):
        h_s, h_t = tensors[0], tensors[3]
        dtypes = (projection_dtype(h_s), None if h_t is None else projection_dtype(h_t))
        # The projections choose their precision themselves (projection.py): autocast would round the "float32"
        # logits to its dtype in the forward and not in a backward that runs outside it.
        with torch.autocast(h_s.device.type, enabled=False):
            return self._forward(tensors, needs_grad, dtypes)

    def _forward(self, tensors, needs_grad, dtypes):
        h_s = tensors[0]
        N = h_s.shape[0]
        acc = accumulate_dtype(dtypes[0])
        projector = _Projector(self.options, dtypes, *tensors[:6])
        eager = self.coefficients is not None
        loss = h_s.new_zeros(N, dtype=acc)
        stats = h_s.new_zeros(4, N, dtype=acc)
        grads = _Grads.new(*tensors[:3], needs_grad) if eager else None
        coef_all = h_s.new_zeros(N, dtype=acc) if eager else None
        kept = []
        for ids in self.chunks:
            s, t, source, valid, per_token = self._chunk(projector, ids, tensors)
            row_grad = torch.empty_like(s)[None] if eager and self.passes is TorchPass else None
            extra = dict(row_grad=row_grad) if self.passes is TorchPass else {}
            loss_c, stats_c, saved = self.passes.forward(s[None], source, valid, *per_token, self.spec, self.shard,
                                                         **extra)
            loss[ids] = loss_c[0].to(acc)
            stats[:, ids] = stats_c[:, 0].to(acc)
            if eager:
                coef = self.coefficients(ids, loss, stats).to(acc)
                coef_all[ids] = coef
                grads.add(self._logits_grad(saved, s, coef, row_grad), ids, projector)
            else:  # backward reattaches the recomputed logits
                kept.append(dataclasses.replace(saved, student=None, teacher=None))
            del s, t, source, saved
        state = dict(dtypes=dtypes, context=weights_context(), needs_grad=needs_grad[:3])
        if eager:
            state["grads"] = grads
            return loss, stats, state, (coef_all,)
        state["kept"] = kept
        return loss, stats, state, tuple(tensors)

    def backward(self, state, saved_tensors, grad_loss):
        nones = (None,) * 8
        if "grads" in state:
            (coef,) = saved_tensors
            return (*state["grads"].finish(_common_scalar(grad_loss, coef), self.shard), *nones)
        tensors = saved_tensors
        dtypes = state["dtypes"]
        grads = _Grads.new(*tensors[:3], state["needs_grad"])
        grad_loss = grad_loss.to(accumulate_dtype(dtypes[0]))
        gather = contextlib.nullcontext() if state["context"] is None else state["context"]()
        with gather, torch.autocast(tensors[0].device.type, enabled=False):
            # The forward's compute dtypes (autocast is usually off by now).
            projector = _Projector(self.options, dtypes, *tensors[:6])
            for ids, kept in zip(self.chunks, state["kept"], strict=True):
                s, t, source, _, _ = self._chunk(projector, ids, tensors)
                teacher = source if isinstance(kept, TorchSaved) else None if t is None else t[None]
                saved = dataclasses.replace(kept, student=s[None], teacher=teacher)
                grads.add(self._logits_grad(saved, s, grad_loss[ids], None), ids, projector)
                del s, t, source, saved
        return (*grads.finish(None, self.shard), *nones)

    def _logits_grad(self, saved, s: torch.Tensor, coef: torch.Tensor, row_grad) -> torch.Tensor:
        return logits_grad(self.options, s, coef, row_grad, lambda c, out: self.passes.backward(saved, c[None], out))


def logits_grad(options, s: torch.Tensor, coef: torch.Tensor, row_grad, backward) -> torch.Tensor:
    """d (sum_i coef_i L_i) / d (h W^T + b) for one chunk, [n, V] in the accumulation dtype; ``backward(coef,
    out [1, n, V])`` writes the pass's d (sum_i coef_i L_i) / d logits (``coef`` [n], or [K, n] for several
    teachers' pass).

    The logit scale is folded into the per-token coefficient; the softcap's derivative needs the logits, so
    the gradient overwrites them (one buffer) only without a softcap."""
    softcap = options.student_softcap
    coef = coef * options.student_logit_scale
    if row_grad is not None:  # the torch pass wrote d L_i / d z during the forward pass
        out = row_grad[0].mul_(coef.unsqueeze(-1).to(row_grad.dtype))
    else:
        out = s if softcap is None else torch.empty_like(s)
        backward(coef, out[None])
    if softcap is not None:
        # d softcap / d x = 1 - (z / c)^2, computed in place in the logits' buffer (no longer needed).
        out.mul_(s.div_(softcap).square_().neg_().add_(1.0))
    return out


def _common_scalar(grad_loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The scalar with d loss / d L = scalar * coef (eager schedule), without a host sync.

    Least squares over the tokens whose coefficient and upstream are finite, in float64 and relative to the
    largest |coef| (so that neither tiny nor huge weights underflow or overflow). A NaN coefficient leaves its
    own rows NaN (they were computed with it) and does not spoil the others'."""
    c, g = coef.double(), grad_loss.double()
    finite = torch.isfinite(c) & torch.isfinite(g)
    c, g = torch.where(finite, c, 0.0), torch.where(finite, g, 0.0)
    top = c.abs().max() if c.numel() else c.new_zeros(())
    top = torch.where(top > 0, top, 1.0)
    c = c / top
    norm = (c * c).sum()
    return torch.where(norm > 0, (g * c).sum() / torch.where(norm > 0, norm, 1.0), 0.0) / top


@dataclass
class _Grads:
    """Gradient accumulators for the student's hidden states, weight and bias (float32, or float64)."""

    h_s: torch.Tensor
    w_s: torch.Tensor
    b_s: torch.Tensor | None
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None

    @classmethod
    def new(cls, h_s, w_s, b_s, needs):
        acc = accumulate_dtype(projection_dtype(h_s))

        def zeros(x, need):
            return None if x is None or not need else torch.zeros(x.shape, dtype=acc, device=x.device)

        return cls(h_s, w_s, b_s, zeros(h_s, needs[0]), zeros(w_s, needs[1]), zeros(b_s, needs[2]))

    def add(self, g: torch.Tensor, ids, projector: _Projector) -> None:
        if self.bias is not None:
            self.bias += g.sum(dim=0, dtype=self.bias.dtype)
        if self.hidden is None and self.weight is None:
            return
        g_c = g.to(projector.dtype_s)  # TRL's convention: the logits-gradient in the compute dtype for both GEMMs
        if self.hidden is not None:
            self.hidden[ids] = matmul_fp32(g_c, projector.w_s).to(self.hidden.dtype)
        if self.weight is not None:
            addmm_fp32(self.weight, g_c.t(), projector.h_s[ids].to(projector.dtype_s))

    def finish(self, scalar, shard=None):
        """The gradients in the parameters' dtypes, times ``scalar`` (eager schedule). Out of place: a second
        backward (retain_graph=True) scales the same accumulators again.

        ``shard`` (vocabulary-parallel, wpkl/parallel/vocab.py): the weight and bias gradients are this rank's
        rows; the hidden states' is this rank's part of a sum over the group, all-reduced here (in float32, one
        [N, H] all-reduce per backward: Megatron's column-parallel output layer makes the same one)."""
        out = []
        for acc, like in ((self.hidden, self.h_s), (self.weight, self.w_s), (self.bias, self.b_s)):
            if acc is None:
                out.append(None)
                continue
            grad = acc if scalar is None else acc * scalar.to(acc.dtype)  # two-phase: fresh accumulators
            if shard is not None and acc is self.hidden:
                shard.sum_(grad)
            out.append(grad.to(like.dtype))
        return out


def linear_terms(problem: Problem, route: Route, coefficients=None) -> TokenTerms:
    """The per-token terms of the fused-linear form. ``coefficients``: the eager schedule's (or None). The
    reference backend materializes the logits and runs the specification (for tests)."""
    student, teacher, batch = problem.student, problem.teacher, problem.batch
    options = problem.spec.linear
    topk = problem.teacher_topk
    B, T = batch.valid.shape
    t_linear = teacher if isinstance(teacher, TeacherLinear) else None
    if route.backend == "reference":
        # Vocabulary-parallel: the hidden states feed every rank's slice, so their gradient is summed over the
        # group (Megatron's copy operator), as the fused path's all-reduce of grad_h does.
        hidden = student.hidden if problem.shard is None else problem.shard.copy(student.hidden)
        s = project(hidden, student.weight, student.bias, options.student_logit_scale, options.student_softcap)
        t = None
        if t_linear is not None:
            with torch.no_grad():
                t = project(t_linear.hidden, t_linear.weight[:problem.vocab],
                            None if t_linear.bias is None else t_linear.bias[:problem.vocab],
                            options.teacher_logit_scale, options.teacher_softcap)
        return reference_terms(s, topk if topk is not None else t, batch.valid, batch.tokens,
                               problem.teacher_logprobs, batch.rollout_logprobs, problem.spec, problem.shard)
    chunk = options.chunk_size or chunk_size_for(problem.vocab, student.hidden.shape[-1],
                                                 "triton" if route.backend == "triton" else "torch")
    chunks = None
    if coefficients is not None:
        chunks = plan_chunks(batch.valid, chunk, whole_rows=coefficients.whole_rows)
        if chunks is None:  # a sequence longer than a chunk: its prefix weights need the two-phase schedule
            coefficients = None
    if chunks is None:
        chunks = plan_chunks(batch.valid, chunk, whole_rows=False)

    def flat(x):
        return None if x is None else x.reshape(B * T, *x.shape[2:])

    tensors = (flat(student.hidden), student.weight, student.bias,
               *((flat(t_linear.hidden), t_linear.weight, t_linear.bias) if t_linear else (None,) * 3),
               flat(batch.tokens), flat(problem.teacher_logprobs), flat(batch.rollout_logprobs),
               flat(None if topk is None else topk.ids), flat(None if topk is None else topk.logprobs))
    loss, stats = TokenDivergence.apply(LinearAdapter(problem, route, chunks, coefficients), *tensors)
    return TokenTerms(loss.view(B, T), *stats.view(4, B, T).unbind(0))
