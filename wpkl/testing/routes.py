"""wpkl's own routes as losses for the harness (what ``wpkl check`` runs): each a ``fn(student, teacher, mask,
temperature=, tokens=)`` on one backend and input form, with the float64 reference of the same options."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

WEIGHTINGS = {  # one of each kind
    "position ExpDecay": lambda w: w.Weighting(position=w.ExpDecay(3.0)),
    "position PowerDecay": lambda w: w.Weighting(position=w.PowerDecay(0.5)),
    "position PositionTable": lambda w: w.Weighting(position=w.PositionTable([1.0, 0.8, 0.5, 0.25])),
    "position PositionWindow": lambda w: w.Weighting(position=w.PositionWindow(0.25, 0.75)),
    "position PositionSigmoid (PW-OPSD)": lambda w: w.Weighting(position=w.PositionSigmoid(), normalize=False),
    "confidence": lambda w: w.Weighting(confidence=1.0),
    "disagreement": lambda w: w.Weighting(disagreement=0.5),
    "accumulated (IW-OPD)": lambda w: w.Weighting(accumulated=0.5, w_max=1.5),
    "prefix_confidence": lambda w: w.Weighting(prefix_confidence=w.PrefixConfidence()),
}
TOPK_MODES = ("tail", "renormalize", "raw")
# Cases the fused-linear form cannot take through an identity lm_head: -inf hidden states make NaN products, and
# an identity [V, V] weight at V = 151936 does not fit.
LINEAR_SKIPS = ("banned_token", "long_rows", "production")


@dataclass(frozen=True)
class Route:
    name: str
    fn: Callable
    reference: Callable
    divergence: str = "reverse_kl"
    cases: tuple[str, ...] | None = None  # None: every case asked for
    skips: tuple[str, ...] = ()


def _sampled_tokens(student, tokens):
    return tokens if tokens is not None else student.detach().argmax(-1)


def _materialized(backend, options, student, teacher, mask, *, temperature=1.0, tokens=None):
    import wpkl

    weighting = options.get("weighting")
    if weighting is not None and weighting.prefix_confidence is not None:
        tokens = _sampled_tokens(student, tokens)  # prefix_confidence reads log q(y) of sampled tokens
    return wpkl.weighted_kl_loss(student, teacher, mask=mask, tokens=tokens, temperature=temperature,
                                 backend=backend, **options)


def _topk(backend, mode, student, teacher, mask, *, temperature=1.0, tokens=None, k=8):
    import wpkl

    V = student.shape[-1]
    logprobs = torch.log_softmax(teacher[..., :V].to(torch.float64 if backend == "reference" else torch.float32), -1)
    values, ids = teacher[..., :V].topk(min(k, V), dim=-1)  # ids from the rounded logits: the same on both sides
    return wpkl.weighted_kl_loss(student, None, mask=mask, teacher_topk_ids=ids,
                                 teacher_topk_logprobs=logprobs.gather(-1, ids), topk_mode=mode,
                                 temperature=temperature, divergence="forward_kl", backend=backend)


def _linear(backend, student, teacher, mask, *, temperature=1.0, tokens=None):
    """The fused-linear form with identity lm_heads: logits = hidden exactly, so the hidden states' gradient is the
    logits' gradient and the materialized reference judges it."""
    import wpkl

    eye_s = torch.eye(student.shape[-1], dtype=student.dtype, device=student.device)
    eye_t = torch.eye(teacher.shape[-1], dtype=teacher.dtype, device=teacher.device)
    return wpkl.fused_linear_kl_loss(student, eye_s, teacher, eye_t, mask=mask, temperature=temperature,
                                     backend=backend, chunk_size=5)


def routes(backends: tuple[str, ...], cuda: bool) -> list[Route]:
    import wpkl

    out = []
    divergences = {"reverse_kl": {}, "forward_kl": {}, "jsd": {"beta": 0.3}, "sampled": {}}
    for backend in backends:
        for divergence, extra in divergences.items():
            options = dict(divergence=divergence, **extra)
            out.append(Route(f"{backend} {divergence}", functools.partial(_materialized, backend, options),
                             functools.partial(_materialized, "reference", options), divergence))
        for kind, make in WEIGHTINGS.items():
            options = dict(weighting=make(wpkl))
            out.append(Route(f"{backend} weighting {kind}", functools.partial(_materialized, backend, options),
                             functools.partial(_materialized, "reference", options)))
        for mode in TOPK_MODES:
            out.append(Route(f"{backend} top-k {mode}", functools.partial(_topk, backend, mode),
                             functools.partial(_topk, "reference", mode), "forward_kl"))
        out.append(Route(f"{backend} fused-linear", functools.partial(_linear, backend),
                         functools.partial(_materialized, "reference", {}), skips=LINEAR_SKIPS))
    if cuda and "triton" in backends:
        compiled = torch.compile(functools.partial(_materialized, "triton", {}), dynamic=False)
        out.append(Route("triton torch.compile", compiled, functools.partial(_materialized, "reference", {})))
    return out
