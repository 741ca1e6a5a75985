"""Top-k teachers: the divergence over a teacher's top-k atoms (TRL's tail bucket, renormalized, or verl's raw
atoms with its clamps).
"""

from __future__ import annotations

import torch

from .core import TokenTerms, compute_dtype, divergence_between, entropy, exact_divergence
from .vocab import gather_ids, vocab_logsumexp, vocab_sum

TOPK_MODES = ("tail", "renormalize", "raw")
# TRL's _add_tail_bucket (trl/experimental/iw_opd/iw_opd_trainer.py): the atoms' log-mass is clamped at -1e-7, so the
# tail atom's log-probability is at least log(1 - exp(-1e-7)) ~ -16.1 and never -inf.
TAIL_LOG_MASS_MAX = -1e-7


def tail_log_prob(log_atoms: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_j exp(log_atoms_j)) over the last dimension, stably (log1p of -expm1), TRL's clamp included."""
    log_mass = torch.logsumexp(log_atoms, dim=-1, keepdim=True).clamp(max=TAIL_LOG_MASS_MAX)
    return torch.log(-torch.expm1(log_mass))


def topk_atom_terms(x, lse, atoms, teacher_logprobs, *, mode, divergence, beta, logprob_floor=None, loss_max=None,
                    stats=True):
    """The divergence over top-k atoms, from the student's scaled logits x = s_j at the K ids (s = logits / T) and
    its log-normalizer lse over the full vocabulary: log p_j = x_j - lse.

    ``atoms``: bool [..., K], False at padding (id -1). ``teacher_logprobs``: the teacher's full-vocabulary log q_j
    of the same ids, used as given (no temperature). Modes (wpkl/api/functional.py documents them):

        tail         atoms S plus one tail atom with log(1 - sum_S p_j), the same for q (TRL's convention)
        renormalize  both restricted to S and renormalized
        raw          the atoms as given: forward KL is sum_S q_j (log q_j - log p_j), verl's top-k forward KL;
                     ``logprob_floor`` clamps both sides' log-probabilities from below (verl's log_prob_min_clamp)

    Returns (L, D, confidence, teacher entropy): L = min(D, loss_max) when ``loss_max`` is given (verl's
    loss_max_clamp; zero gradient where it clamps), else D. Confidence is max_j q_j over the given atoms; the
    teacher entropy is over the mode's atoms (a support estimate). Rows with no atom give D = 0. Differentiable
    in x and lse (the kernels use autograd of this function for their gradient's per-row coefficients).
    """
    neg_inf = x.new_full((), float("-inf"))  # (a fill: no host-to-device copy)
    log_p = torch.where(atoms, x - lse.unsqueeze(-1), neg_inf)
    log_q = torch.where(atoms, teacher_logprobs.to(x.dtype), neg_inf)
    if mode == "raw" and logprob_floor is not None:
        log_p = torch.where(atoms, log_p.clamp_min(logprob_floor), neg_inf)
        log_q = torch.where(atoms, log_q.clamp_min(logprob_floor), neg_inf)
    if mode == "tail":
        log_p = torch.cat([log_p, tail_log_prob(log_p)], dim=-1)
        log_q = torch.cat([log_q, tail_log_prob(log_q)], dim=-1)
    elif mode == "renormalize":
        any_atom = atoms.any(dim=-1, keepdim=True)
        log_p = torch.where(atoms, log_p - torch.where(any_atom, torch.logsumexp(log_p, -1, keepdim=True), 0.0), neg_inf)
        log_q = torch.where(atoms, log_q - torch.where(any_atom, torch.logsumexp(log_q, -1, keepdim=True), 0.0), neg_inf)
    elif mode != "raw":
        raise ValueError(f"unknown topk_mode {mode!r}; expected one of {TOPK_MODES}")
    p, q = log_p.exp(), log_q.exp()
    div = divergence_between(divergence, beta, p, log_p, q, log_q)
    loss = div if loss_max is None else div.clamp(max=loss_max)
    if not stats:
        return loss, div.detach(), None, None
    with torch.no_grad():
        confidence = torch.where(atoms, teacher_logprobs.to(x.dtype), neg_inf).amax(dim=-1).exp()
        return loss, div.detach(), confidence, entropy(q, log_q)


def topk_terms(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    mode: str = "tail",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    logprob_floor: float | None = None,
    loss_max: float | None = None,
    stats: bool = True,
    shard=None,
) -> TokenTerms:
    """Per-row terms against a teacher given as top-k atoms (ids [..., K], -1 pads; log q of those ids).

    ``shard``: as in ``token_terms`` (the ids are global; each rank supplies the student logits of the ids it
    holds)."""
    divergence = exact_divergence(divergence, beta)
    dtype = compute_dtype(student_logits)
    s = student_logits.to(dtype)
    s = s / temperature if temperature != 1.0 else s
    lse = vocab_logsumexp(s, shard=shard)
    atoms = topk_ids >= 0
    x = gather_ids(s, topk_ids, shard)
    loss, div, confidence, teacher_entropy = topk_atom_terms(
        x, lse, atoms, topk_logprobs, mode=mode, divergence=divergence, beta=beta, logprob_floor=logprob_floor,
        loss_max=loss_max, stats=stats)
    if not stats:
        return TokenTerms(loss, div, None, None, None)
    with torch.no_grad():
        log_p = s - lse.unsqueeze(-1)
        return TokenTerms(loss, div, confidence, vocab_sum(entropy(log_p.exp(), log_p), shard=shard),
                          teacher_entropy)

