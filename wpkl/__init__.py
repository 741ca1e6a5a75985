"""wpkl: a fused, weighted, token-level KL loss for on-policy distillation.

    loss = wpkl.weighted_kl_loss(student_logits, teacher_logits, mask=mask,
                                 weighting=wpkl.Weighting(accumulated=0.5))
"""

from .api import WeightedKLLoss, weighted_kl_loss
from .stats import TokenStats
from .weighting import ExpDecay, PositionTable, PositionWindow, PowerDecay, Weighting

__version__ = "0.1.0"

__all__ = [
    "ExpDecay",
    "PositionTable",
    "PositionWindow",
    "PowerDecay",
    "TokenStats",
    "Weighting",
    "WeightedKLLoss",
    "weighted_kl_loss",
]
