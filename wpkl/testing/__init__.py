"""Gradient-correctness testing for distillation losses, yours or wpkl's own: ``check_loss`` judges a loss
against wpkl's float64 reference on named cases (cases.py: each targets a bug class real implementations had)
across dtypes; ``assert_loss_correct`` raises with the table. ``wpkl.testing.strategies`` (needs hypothesis)
gives property-test strategies for OPD batches. ``wpkl check`` runs the same harness on wpkl's own routes.

    from wpkl.testing import assert_loss_correct
    assert_loss_correct(my_loss, divergence="forward_kl", reduction="mean")
"""

from .cases import CASE_NAMES, CASES, Case
from .harness import CaseResult, LossReport, assert_loss_correct, check_loss
from .judge import GRAD_TOL, VALUE_TOL, judge_grad, judge_value

__all__ = ["CASES", "CASE_NAMES", "Case", "CaseResult", "GRAD_TOL", "LossReport", "VALUE_TOL", "assert_loss_correct",
           "check_loss", "judge_grad", "judge_value"]


def __getattr__(name: str):
    if name == "strategies":  # hypothesis is a test extra: imported on first use
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
