"""wpkl: a fused, weighted, token-level KL loss for on-policy distillation.

    loss = wpkl.weighted_kl_loss(student_logits, teacher_logits, mask=mask,
                                 weighting=wpkl.Weighting(accumulated=0.5))
"""

from .inputs.checks import DeferredCheckError, check_errors
from .api import FusedLinearWeightedKLLoss, WeightedKLLoss, fused_linear_kl_loss, weighted_kl_loss
from .api.variants import entropy_gated_loss, multi_teacher_loss
from .stats import TokenStats
from .weighting import (ExpDecay, PositionSigmoid, PositionTable, PositionWindow, PowerDecay, PrefixConfidence,
                        TokenImportance,
                        Weighting)

__version__ = "0.1.0"

# Submodules reachable as attributes (wpkl.audit.PositionBiasMonitor after a bare `import wpkl`) without
# importing them, or what they need, until first use.
_LAZY_SUBMODULES = ("audit", "distributed", "integrations", "testing")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DeferredCheckError",
    "ExpDecay",
    "FusedLinearWeightedKLLoss",
    "PositionTable",
    "PositionWindow",
    "PositionSigmoid",
    "PowerDecay",
    "PrefixConfidence",
    "TokenImportance",
    "TokenStats",
    "Weighting",
    "WeightedKLLoss",
    "check_errors",
    "entropy_gated_loss",
    "multi_teacher_loss",
    "fused_linear_kl_loss",
    "weighted_kl_loss",
]
