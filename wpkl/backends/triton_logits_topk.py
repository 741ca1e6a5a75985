"""Logits teachers and top-k teachers in one pass (wpkl.multi_teacher_loss mixing both forms): the student row is
read once forward and once backward for all of them.

    forward(student [B, T, V], teachers [logits tensors, then TopK], valids [K, B, T], spec) -> loss [K, B, T],
            stats [K, 4, B, T], saved
    backward(saved, coef [K, B, T], out [B, T, V])

Forward: the logits teachers' mixture kernel (kernels/token_mixture.py) gives the student's log-normalizer and
entropy on the rows its teachers see, and the top-k teachers' atom math needs nothing else of the row
(triton_topk.py: ``topk_atoms``): so the kernels take the top-k teachers' tokens as ``rows``, where the student's
terms are written in the first logits teacher's slot even where no logits teacher sees the token (only the student
row is read there; the logits teachers' rows are read on their own tokens only).

Backward, by linearity: the mixture kernel with the top-k teachers' dense part p_v sum_k c_k Lambda_k / T added to
every element (kernels/token_mixture_bwd.py: DENSE), then the top-k teachers' merged atoms (``merged_atoms``):
kernels/token_mixture_bwd.py's atoms kernel rewrites each atom column with its whole gradient, the same math at
the atom ids in float32 plus sum_k c_k A_k,v / T, so every element is rounded once (in half precision the dense
part and an atom's own term often nearly cancel: adding to the rounded element would keep the dense part's
rounding error).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..reference import TopK
from ..spec import LossSpec
from .common import kernels, launch
from .triton_mixture import MixtureSaved, TritonMixturePass, atoms_launch
from .triton_topk import atom_blocks, merged_atoms, topk_atoms


@dataclass
class LogitsTopKSaved:
    """What backward needs; ``student`` and ``teachers`` (the logits teachers') may be dropped after forward and
    attached again (the fused-linear form recomputes them chunk by chunk)."""

    student: torch.Tensor | None
    teachers: list | None
    mixture: MixtureSaved  # the logits teachers' kernel state, without its student and teachers
    atoms: list  # each top-k teacher's TopKSaved
    lams: torch.Tensor  # [K_top, N] fp32 Lambda
    valids: torch.Tensor  # [K, N] bool, every teacher's own rows
    rows: torch.Tensor  # [N] int8: some top-k teacher sees the row
    spec: LossSpec


def _at(student, ids):
    """The student's raw logits [N, A] fp32 at the atom ids (-1 pads: any column), gathered from the [B, T, V] view
    as it is (no copy of a strided student), before the backward kernel may write the gradient over them."""
    B, T, V = student.shape
    return student.gather(-1, ids.clamp(0, V - 1).view(B, T, -1)).reshape(ids.shape).to(torch.float32)


class TritonLogitsTopKPass:
    @staticmethod
    def forward(student, teachers, valids, spec: LossSpec):
        B, T, _ = student.shape
        N, K = B * T, len(teachers)
        logits = [t for t in teachers if not isinstance(t, TopK)]
        topk = [t for t in teachers if isinstance(t, TopK)]
        L = len(logits)
        assert L > 0 and topk and all(isinstance(t, TopK) for t in teachers[L:]), "logits teachers, then top-k ones"
        valids = valids.reshape(K, N)
        rows = valids[L:].any(0).to(torch.int8)  # the top-k teachers' tokens
        loss_l, public_l, mixture = TritonMixturePass.forward(student, logits, valids[:L].view(L, B, T), spec,
                                                              rows=rows)
        stats = mixture.stats[0]  # [NUM_STATS, N]: the student's T lse and entropy on the top-k teachers' rows too
        parts = [topk_atoms(student, stats, t, valid.view(B, T), spec) for t, valid in zip(topk, valids[L:],
                                                                                          strict=True)]
        # teacher 0's stats on its own tokens only (a new tensor: the saved statistics stay whole)
        first = torch.where(valids[0].view(B, T), public_l[0], 0.0)[None]
        loss = torch.cat([loss_l, torch.stack([p[0] for p in parts]).view(len(topk), B, T)])
        public = torch.cat([first, public_l[1:], torch.stack([p[1] for p in parts]).view(len(topk), 4, B, T)])
        lams = torch.stack([p[3] for p in parts]).to(torch.float32)
        saved = LogitsTopKSaved(student, logits, replace(mixture, student=None, teachers=None), [p[2] for p in parts],
                                lams, valids, rows, spec)
        return loss, public, saved

    @staticmethod
    def backward(saved: LogitsTopKSaved, coef: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        K, N = saved.valids.shape
        L = K - len(saved.atoms)
        c = torch.where(saved.valids, coef.reshape(K, N).to(torch.float32), 0.0)
        dense = (c[L:] * saved.lams).sum(0)  # sum_k c_k Lambda_k
        logits = c[:L].contiguous()
        mixture = replace(saved.mixture, student=saved.student, teachers=saved.teachers)
        atoms = merged_atoms(saved.atoms, saved.valids[L:], c[L:])
        blocks = [(ids, a, _at(saved.student, ids)) for ids, a, _ in atom_blocks(atoms)] if N > 0 else []
        TritonMixturePass.backward(mixture, logits, out, dense=dense)  # (``out`` may be the student's storage)
        for ids, a, s in blocks:
            grid, args, meta = atoms_launch(mixture.student, mixture.teachers, mixture.valid, logits, dense,
                                            mixture.stats, ids, s, a, saved.rows, out, mixture.div_id,
                                            saved.spec.temperature, saved.spec.beta)
            launch(kernels().token_mixture_atoms_kernel, grid, args, meta)
        return out
