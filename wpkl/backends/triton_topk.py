"""A top-k teacher on the Triton kernels: the student row is read once forward (the forward kernel as "sampled"
without teacher logits), the atom math of the specification runs on [N, K] tensors, and backward is the sampled
backward kernel plus kernels/token_topk.py's fix-up of the K atoms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import TopK, topk_atom_terms
from ..spec import LossSpec
from . import common
from .common import divergence_id, kernels, launch
from .triton_pass import TritonPass, TritonSaved, forward_launch


@dataclass
class TopKSaved:
    """A top-k teacher's backward inputs, [N, K] each (the row terms are in the stats: see ``topk_forward``)."""

    ids: torch.Tensor  # int64, -1 pads
    x: torch.Tensor  # fp32 s_j / T at the ids
    atom_grad: torch.Tensor  # fp32 A = dF/dx



def topk_forward(student, teacher: TopK, valid, tokens, teacher_logprobs, rollout_logprobs, spec: LossSpec,
                 shard=None):
    """A top-k teacher on the kernels: one pass over each student row (the forward kernel as "sampled" without
    teacher logits gives the student's log-normalizer and entropy), then the atom math of the specification
    (wpkl/reference/topk.py ``topk_atom_terms``) on [N, K] tensors under autograd, for the loss, the divergence, the
    statistics and the per-row backward inputs A = dF/dx and Lambda = dF/dlse. No [N, V] tensor is made.

    The stats buffer then holds what the backward kernels read: the student's T lse (STAT_STUDENT_LSE) and
    -Lambda in the sampled multiplier's slot (STAT_AUX), so that the "sampled" backward kernel with no sampled token writes the dense
    part of the gradient, p_v Lambda / T (kernels/token_topk.py adds the atoms' own terms)."""
    k = kernels()
    B, T, V = student.shape
    N, K = B * T, teacher.ids.shape[-1]
    loss = common.new_buffer(N, dtype=torch.float32, device=student.device)
    stats = common.new_buffer(k.NUM_STATS, N, dtype=torch.float32, device=student.device)
    valid_bytes = valid.reshape(N).to(torch.int8)
    ids = teacher.ids.reshape(N, K).to(torch.int64).contiguous()  # the atoms kernel indexes row * K + k
    if N > 0:
        # The kernel's sampled-token slot: any in-range column (its loss is discarded; it reads the unused
        # log q(y) slot from ``loss``, which is overwritten below).
        slot = (ids[:, 0].clamp(0, max(V - 1, 0)).contiguous() if K > 0
                else torch.zeros_like(valid_bytes, dtype=torch.int64))
        grid, args, meta = forward_launch(student, None, valid_bytes, slot, loss, None, loss, stats,
                                          divergence_id("sampled"), spec.beta, spec.temperature)
        launch(k.token_divergence_fwd_kernel, grid, args, meta)
    valid_flat = valid.reshape(N, 1)
    in_range = (ids >= -1) & (ids < V)
    gathered = student.gather(-1, ids.clamp(0, max(V - 1, 0)).view(B, T, K)).reshape(N, K).to(torch.float32)
    # An id >= V (the value checks report it) gives its row a NaN loss, never a number from another column; ids
    # below -1 are padding, as in the specification (and reported by the checks too).
    x = torch.where(in_range | ~valid_flat, gathered / spec.temperature, float("nan"))
    lse = stats[4] / spec.temperature  # STAT_STUDENT_LSE holds T lse(s / T)
    atoms = valid_flat & (ids >= 0)
    options = spec.topk
    divergence, beta = spec.exact_divergence, spec.beta
    with torch.enable_grad():
        x_leaf, lse_leaf = x.detach().requires_grad_(True), lse.detach().requires_grad_(True)
        terms = topk_atom_terms(x_leaf, lse_leaf, atoms, teacher.logprobs.reshape(N, K), mode=options.mode,
                                divergence=divergence, beta=beta, logprob_floor=options.logprob_floor,
                                loss_max=options.loss_max, stats=True)
        atom_grad, lam = torch.autograd.grad(terms[0].sum(), (x_leaf, lse_leaf))
    row_valid = valid.reshape(N)
    public = torch.stack([terms[1], terms[2], stats[2], terms[3]])
    public = torch.where(row_valid, public, 0.0).to(torch.float32).view(4, B, T)
    loss = torch.where(row_valid, terms[0].detach(), 0.0).to(torch.float32)
    from ..kernels import common as rows

    stats[int(rows.STAT_AUX.value)] = torch.where(row_valid, -lam, 0.0)  # the backward kernel's multiplier slot
    no_token = torch.full((N,), -1, dtype=torch.int64, device=student.device)  # the dense part: no one-hot
    saved = TritonSaved(student, None, valid_bytes, no_token, stats, divergence_id("sampled"), spec,
                        TopKSaved(ids, x, atom_grad))
    return loss.view(B, T), public, saved


def topk_backward(saved: TritonSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sampled backward kernel with no sampled token (the dense p_v Lambda / T), then the K atoms' terms."""
    TritonPass.backward(saved, coef, out)
    B, T, V = saved.student.shape
    N, K = saved.topk.ids.shape
    if N == 0 or K == 0:
        return out
    coef = coef.reshape(N).to(torch.float32).contiguous()
    grid = (N,)
    args = (saved.topk.ids, saved.topk.atom_grad, saved.topk.x, saved.stats, coef, saved.valid_bytes, out,
            N, K, T, V, out.stride(0), out.stride(1), 1.0 / saved.spec.temperature)
    launch(kernels().topk_atoms_bwd_kernel, grid, args, topk_atoms_meta(K))
    return out


class TritonTopKPass:
    """The Triton pass's contract for a top-k teacher (``teacher`` a ``TopK``)."""

    forward = staticmethod(topk_forward)
    backward = staticmethod(topk_backward)


def topk_atoms_meta(K: int) -> dict:
    """The atoms' fix-up kernel's meta: one block of K (a power of two) per token, one warp."""
    return dict(BLOCK_K=1 << max(0, (K - 1).bit_length()), num_warps=1)


