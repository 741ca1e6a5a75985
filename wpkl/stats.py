"""Per-token statistics returned with ``return_stats=True``, for logging and position-bias audits."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class TokenStats:
    """Detached float32 tensors of the logits' leading shape; 0 on masked tokens.

    divergence          D_i, the per-token divergence (for "sampled": log p(y) - log q(y))
    weight              w_i, the token's weight in the loss
    teacher_confidence  c_i = max_j q_ij
    teacher_entropy     -sum_j q_ij log q_ij
    student_entropy     -sum_j p_ij log p_ij
    position            the token's position among the valid tokens of its sequence (or the given positions)
    mask                bool, the valid tokens
    """

    divergence: torch.Tensor
    weight: torch.Tensor
    teacher_confidence: torch.Tensor
    teacher_entropy: torch.Tensor
    student_entropy: torch.Tensor
    position: torch.Tensor
    mask: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
