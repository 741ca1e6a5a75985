"""The vocabulary-parallel Triton pass, in three named stages around its collectives (Megatron's cross-entropy
layout): the forward kernel on this rank's slice (local), ``merge_kernel_stats`` (two all-reduces of float64
per-token statistics: the maxima, then the sums), and the unchanged backward kernel on the slice with the merged
statistics (no collective in backward: the per-token statistics are all it needs)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..backends.common import divergence_id, kernels
from ..backends.triton_pass import TritonPass, jsd_partials
from ..spec import LossSpec
from .vocab import local_tokens, owned_logit


def _stat_rows():
    """The rows of the kernels' statistics buffer (kernels/common.py), as plain ints."""
    from types import SimpleNamespace

    from ..kernels import common

    return SimpleNamespace(**{name: int(getattr(common, name).value) for name in dir(common)
                              if name.startswith("STAT_")})


def merge_kernel_stats(stats: torch.Tensor, valid: torch.Tensor, divergence: str, temperature: float, shard,
                       s_y=None, u_y=None, teacher_logprobs=None, rollout_logprobs=None, power=None) -> torch.Tensor:
    """The whole vocabulary's per-token statistics from each rank's forward-kernel statistics of its slice.

    Each rank's kernel ran on its slice as if it were the whole vocabulary: its statistics are those of the
    slice's own softmax p_r (log-normalizer l_r, entropy H_r, mean a_r = E_{p_r}[s - u], max q_r). With
    w_r = exp(l_r - l) the share of the slice in the global softmax (l = logsumexp_r l_r), the global ones are

        E_p[f] = sum_r w_r E_{p_r}[f]          H(p) = sum_r w_r H_r - sum_r w_r log w_r
        max q = exp(max_r (l_r + log max q_r) - l)

    A KL merges by the chain rule from the slices' own D_r and exact lse gaps (below: no difference of rounded
    normalizers); "sampled" follows kernels/common.py's finalize_token, from log p(y) = s_y / T - lse_s (and
    log q(y) likewise, or given; ``power``: ``sampled_power``). ``divergence=None``: the student's lse and entropy
    only (a top-k teacher's atoms need nothing else: wpkl/parallel/shard_topk.py), the other rows left as they
    are and a loss of 0. Two all-reduces of float64 (the maxima [m, N], then the sums [k, N]). ``stats``: the
    kernel's [NUM_STATS, N] buffer, overwritten with the global statistics (what the backward kernel reads, raw
    logit units) and returned; the loss [N] is returned alongside.
    ``s_y``, ``u_y``: the raw logits at the sampled tokens on the rank that holds them, 0 elsewhere (float64).
    """
    k = _stat_rows()
    T = temperature
    teacher = divergence not in ("sampled", None) or u_y is not None
    f64 = stats.double()
    ls, lu = f64[k.STAT_STUDENT_LSE] / T, f64[k.STAT_TEACHER_LSE] / T  # natural units of s / T
    has_s, has_u = ls > float("-inf"), lu > float("-inf")  # a slice of all -inf logits has no share
    log_conf = torch.where(has_u, f64[k.STAT_CONFIDENCE].log() + lu, float("-inf"))  # max_j u_j / T of the slice
    # The slice's lse_s - lse_u, from the kernel's shifted sums: exact where p_r ~ q_r, where the difference of
    # the separately rounded float32 log-normalizers would not be (see the KL merge below).
    both = has_s & has_u
    gap = torch.where(both, f64[k.STAT_LSE_GAP] / T, float("-inf"))
    kl = divergence in ("reverse_kl", "forward_kl")
    # (KL: also whether some slice has one side's mass and not the other's: the divergence is then infinite)
    one_sided = [(has_s & ~has_u).double(), (has_u & ~has_s).double()] if kl else []
    # (rows: the student's max, the teacher's and its confidence's, then a KL's gap and one-sided flags)
    maxima = shard.max(torch.stack([ls] + ([lu, log_conf] if teacher else []) + ([gap] if kl else []) + one_sided))
    finite = torch.isfinite(maxima)
    m_s, m_u, m_c = torch.where(finite, maxima, 0.0).unbind(0)[:3] if teacher else (
        torch.where(finite[0], maxima[0], 0.0), None, None)
    a = torch.where(has_s, (ls - m_s).exp(), 0.0)
    b = torch.where(has_u, (lu - m_u).exp(), 0.0) if teacher else None

    def weighted(weight, x):  # 0 where the slice has no share (its own statistics are NaN there)
        return torch.where(weight > 0, weight * x, 0.0)

    parts = [a, weighted(a, f64[k.STAT_STUDENT_ENTROPY]), weighted(a, ls - m_s)]
    if teacher:
        parts += [b, weighted(b, f64[k.STAT_TEACHER_ENTROPY]), weighted(b, lu - m_u)]
    if kl:
        # The KL of the merged distributions as the slices' own KLs plus the KL of the slices' shares (chain rule):
        # reverse  D = sum_r alpha_r D_r + sum_r alpha_r g_r - G,   forward  D = sum_r beta_r D_r + G - sum_r beta_r g_r
        # with beta_r = b_r / z_u the teacher's share of slice r, g_r its lse gap, G = log sum_r beta_r e^{g_r} the
        # global gap and alpha_r = beta_r e^{g_r - G} the student's share. Every term is computed from the gaps and
        # the slices' divergences, never from a difference of rounded normalizers: exact for close distributions.
        m_g = torch.where(finite[3], maxima[3], 0.0)
        c = weighted(b, (gap - m_g).exp())  # beta_r e^{g_r - m_g} z_u: alpha_r up to normalization
        mine = c if divergence == "reverse_kl" else b
        parts += [c, weighted(mine, f64[k.STAT_DIVERGENCE]), weighted(mine, gap - m_g),
                  weighted(a if divergence == "reverse_kl" else b, f64[k.STAT_AUX])]
    if divergence == "sampled":
        parts += [s_y] + ([u_y] if u_y is not None else [])
    sums = shard.sum(torch.stack(parts))
    z_s, e_s, g_s = sums[0], sums[1], sums[2]
    lse_s = m_s + z_s.log()
    student_entropy = (e_s - g_s) / z_s + z_s.log()
    if divergence is None:
        stats[k.STAT_STUDENT_LSE] = torch.where(valid, lse_s * T, 0.0).to(stats.dtype)
        stats[k.STAT_STUDENT_ENTROPY] = torch.where(valid, student_entropy, 0.0).to(stats.dtype)
        return torch.zeros_like(lse_s, dtype=torch.float32)
    nan = torch.full_like(lse_s, float("nan"))
    lse_u, teacher_entropy, confidence = torch.zeros_like(lse_s), nan, nan
    if teacher:
        z_u, e_u, g_u = sums[3], sums[4], sums[5]
        lse_u = m_u + z_u.log()
        teacher_entropy = (e_u - g_u) / z_u + z_u.log()
        confidence = (m_c - lse_u).exp()
    aux = torch.zeros_like(lse_s)
    lse_gap = lse_s - lse_u
    if kl:
        z_c, d_sum, g_sum, aux_sum = sums[6], sums[7], sums[8], sums[9]
        # G = log sum_r beta_r e^{g_r}, over the slices where both sides have mass: the global gap unless some slice
        # has the student's mass and not the teacher's, whose share it leaves out; there (never close
        # distributions: no cancellation to keep) the difference of the merged normalizers. Forward KL and jsd's
        # second pass need it (reverse KL is infinite there).
        student_only = maxima[4] > 0
        lse_gap = torch.where(student_only, (m_s + z_s.log()) - (m_u + z_u.log()), m_g + (z_c / z_u).log())
        weight_sum = z_c if divergence == "reverse_kl" else z_u
        shares_kl = g_sum / weight_sum - (lse_gap - m_g)  # sum_r alpha_r g_r - G (reverse) or its beta mean
        if divergence == "reverse_kl":
            aux = aux_sum / z_s
            divergence_value = d_sum / z_c + shares_kl
        else:
            aux = aux_sum / z_u
            divergence_value = d_sum / z_u - shares_kl
        # A slice where the side a KL weighs has mass and the other none (reverse: the student's, forward: the
        # teacher's): the divergence is infinite (the kernel's own D_r of such a slice is not a share of anything).
        infinite = maxima[4 if divergence == "reverse_kl" else 5] > 0
        divergence_value = torch.where(infinite, float("inf"), divergence_value)
        loss = divergence_value
    else:  # sampled
        rest = sums[6:] if teacher else sums[3:]
        log_p_y = rest[0] / T - lse_s
        log_q_y = rest[1] / T - lse_u if teacher else teacher_logprobs.double()
        behaviour = log_p_y if rollout_logprobs is None else rollout_logprobs.double()
        divergence_value = behaviour - log_q_y
        # the backward kernel's multiplier -a (STAT_AUX): D, or PowerOPD's p(y)^power - q(y)^power
        aux = divergence_value if power is None else (power * behaviour).exp() - (power * log_q_y).exp()
        loss = aux * log_p_y
    rows = {k.STAT_DIVERGENCE: divergence_value, k.STAT_CONFIDENCE: confidence,
            k.STAT_STUDENT_ENTROPY: student_entropy, k.STAT_TEACHER_ENTROPY: teacher_entropy,
            k.STAT_STUDENT_LSE: lse_s * T, k.STAT_TEACHER_LSE: lse_u * T, k.STAT_AUX: aux,
            k.STAT_LSE_GAP: lse_gap * T}
    for row, value in rows.items():
        stats[row] = torch.where(valid, value, 0.0).to(stats.dtype)
    return torch.where(valid, loss, 0.0).float()


def merge_jsd(stats: torch.Tensor, partials: torch.Tensor, valid: torch.Tensor, beta: float, shard) -> torch.Tensor:
    """jsd from every rank's second-pass sums (``jsd_partials``: [4, N], additive over the vocabulary), summed
    over the group in float64 (one all-reduce) and finalized as kernels/common.py's finalize_jsd does: the
    divergence in nats and KL(p || m) in bits (the backward kernel's STAT_AUX) into ``stats``; returns the loss."""
    k = _stat_rows()
    m_p, m_q, mass_p, mass_q = shard.sum(partials.double())
    kl2_pm, kl2_qm = -m_p / mass_p, -m_q / mass_q
    divergence = (beta * kl2_qm + (1.0 - beta) * kl2_pm) * math.log(2.0)
    stats[k.STAT_DIVERGENCE] = torch.where(valid, divergence, 0.0).to(stats.dtype)
    stats[k.STAT_AUX] = torch.where(valid, kl2_pm, 0.0).to(stats.dtype)
    return torch.where(valid, divergence, 0.0).float()


class ShardedTritonPass:
    """The vocabulary passes' contract (wpkl/backends/triton_pass.py) for a vocabulary slice, with the Triton kernels: the
    forward kernel on the slice, ``merge_kernel_stats`` (two all-reduces), and the unchanged backward kernel on
    the slice with the merged statistics (no collective: the per-token statistics are all it needs).
    reverse_kl, forward_kl and sampled; jsd (0 < beta < 1), whose second pass needs the whole vocabulary's
    normalizers: the forward kernel as reverse KL gives the slice's (read once), merged, then jsd's second pass on
    the slice with them (``jsd_partials``) and one all-reduce of its four sums (``merge_jsd``): three
    collectives, reading the slice twice as the one-device jsd reads the row."""

    @staticmethod
    def forward(student, teacher, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec, shard):
        divergence = spec.exact_divergence
        B, T, _ = student.shape
        if divergence == "jsd":
            first = spec.replace(divergence="reverse_kl")  # its normalizers, lse gap and entropies (its KL unused)
            _, _, saved = TritonPass.forward(student, teacher, valid, None, None, None, first)
            flat = valid.reshape(-1)
            merge_kernel_stats(saved.stats, flat, "reverse_kl", spec.temperature, shard)
            partials = jsd_partials(student, teacher, saved.valid_bytes, saved.stats, spec)
            loss = merge_jsd(saved.stats, partials, flat, spec.beta, shard)
            saved = replace(saved, div_id=divergence_id("jsd"), spec=spec)
            public = kernels().NUM_PUBLIC_STATS
            return loss.view(B, T), saved.stats[:public].view(public, B, T), saved
        local = local_tokens(tokens, shard)
        _, _, saved = TritonPass.forward(student, teacher, valid, local, teacher_logprobs, rollout_logprobs, spec)
        s_y = u_y = None
        if divergence == "sampled":
            # Gathered from the [B, T, V] views as they are (a reshape would copy strided logits).
            s_y = owned_logit(student, local.view(B, T)).reshape(-1)
            if teacher is not None:
                u_y = owned_logit(teacher[..., :student.shape[-1]], local.view(B, T)).reshape(-1)
        per_token = [None if x is None else x.reshape(-1) for x in (teacher_logprobs, rollout_logprobs)]
        loss = merge_kernel_stats(saved.stats, valid.reshape(-1), divergence, spec.temperature, shard, s_y, u_y,
                                  *per_token, power=spec.sampled_power)
        public = kernels().NUM_PUBLIC_STATS
        return loss.view(B, T), saved.stats[:public].view(public, B, T), saved

    backward = staticmethod(TritonPass.backward)
