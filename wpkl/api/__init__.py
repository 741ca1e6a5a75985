"""The public layer: the functions (functional.py) and the modules that hold their options (modules.py)."""

from .functional import fused_linear_kl_loss, weighted_kl_loss
from .modules import FusedLinearWeightedKLLoss, WeightedKLLoss

__all__ = ["FusedLinearWeightedKLLoss", "WeightedKLLoss", "fused_linear_kl_loss", "weighted_kl_loss"]
