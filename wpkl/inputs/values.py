"""The checks that need the inputs' values: a token out of range, a negative weight, probabilities passed as
log-probabilities, a top-k list with repeated ids. On the CPU they raise at once; on CUDA without a host sync
(wpkl/inputs/checks.py). The fused Triton route makes the ``CHECKS`` inside its weights kernel instead.
"""

from __future__ import annotations

import torch

from .checks import run_checks
from .data import Problem

# Log-probabilities are <= 0; this much above 0 is accepted as rounding (a server's fp32 log_softmax of a
# near-certain token), anything larger is rejected (probabilities passed by mistake).
LOGPROB_TOLERANCE = 1e-3

# The value checks, in the order of the weights kernel's flags (kernels/token_weights.py).
CHECKS = ("token_weights", "positions", "tokens", "teacher_logprobs_finite", "teacher_logprobs_range",
          "rollout_logprobs_finite", "rollout_logprobs_range", "num_items_in_batch")


# Checks of inputs only the torch weights read (the Triton path does not take them).
TORCH_CHECKS = ("teacher_token_logprobs_finite", "teacher_token_logprobs_range", "sequence_ids")

# The top-k teacher's checks (torch ops on every path).
TOPK_CHECKS = ("topk_ids_range", "topk_ids_duplicate", "topk_logprobs_finite", "topk_logprobs_range")


def check_message(check: str, vocab: int) -> str:
    if check == "topk_ids_range":
        return f"teacher_topk_ids must lie in [0, V) = [0, {vocab}), or be -1 (padding), on valid tokens"
    if check == "topk_ids_duplicate":
        return "teacher_topk_ids must not repeat an id within a token's list (padding -1 aside)"
    if check == "topk_logprobs_finite":
        return "teacher_topk_logprobs must not be NaN on the given ids (-inf is a token the teacher bans)"
    if check == "topk_logprobs_range":
        return (f"teacher_topk_logprobs must be log-probabilities (<= 0, up to {LOGPROB_TOLERANCE} of rounding) on "
                "the given ids; were probabilities passed?")
    if check == "token_weights":
        return "token_weights must be finite and >= 0 on valid tokens"
    if check == "positions":
        return "positions must be >= 0 on valid tokens"
    if check == "tokens":
        return f"tokens must lie in [0, V) = [0, {vocab}) on valid tokens"
    if check == "sequence_ids":
        return "sequence_ids must be >= 0 (on every token: masked tokens hold their place in the sequence too)"
    if check == "num_items_in_batch":
        return "num_items_in_batch must be finite and > 0 when there are valid tokens"
    name, kind = check.rsplit("_", 1)
    if kind == "finite":
        return f"{name} must be finite on valid tokens"
    return (f"{name} must be log-probabilities (<= 0, up to {LOGPROB_TOLERANCE} of rounding) on valid tokens; were "
            "probabilities passed?")


def check_values(problem: Problem) -> torch.Tensor | None:
    """The checks that need the data, as torch ops: at once on the CPU, without a host sync on CUDA
    (wpkl/inputs/checks.py). The fused route makes the same checks inside its weights kernel instead.
    Returns the flags (on CUDA, deferred: a sync-free agreement carries them to the other ranks)."""
    batch = problem.batch
    valid = batch.valid
    vocab = problem.global_vocab  # token ids are global
    bad = {}
    if batch.token_weights is not None:
        w = batch.token_weights
        bad["token_weights"] = valid & ~(torch.isfinite(w) & (w >= 0))
    if batch.positions is not None and batch.sequence_ids is None:  # with ids they only place tokens (any int)
        bad["positions"] = valid & (batch.positions < 0)
    if batch.sequence_ids is not None:
        bad["sequence_ids"] = batch.sequence_ids < 0
    if batch.tokens is not None:
        bad["tokens"] = valid & ((batch.tokens < 0) | (batch.tokens >= vocab))
    for name, x in (("teacher_logprobs", problem.teacher_logprobs), ("rollout_logprobs", batch.rollout_logprobs),
                    ("teacher_token_logprobs", batch.teacher_token_logprobs)):
        if x is not None:
            bad[f"{name}_finite"] = valid & ~torch.isfinite(x)
            bad[f"{name}_range"] = valid & (x > LOGPROB_TOLERANCE)
    if problem.teacher_topk is not None:
        ids, logprobs = problem.teacher_topk
        atoms = valid.unsqueeze(-1) & (ids >= 0)
        bad["topk_ids_range"] = valid.unsqueeze(-1) & ((ids < -1) | (ids >= vocab))
        ordered = ids.sort(dim=-1).values
        bad["topk_ids_duplicate"] = valid.unsqueeze(-1) & (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        bad["topk_logprobs_finite"] = atoms & torch.isnan(logprobs)
        bad["topk_logprobs_range"] = atoms & (logprobs > LOGPROB_TOLERANCE)
    if batch.num_items_in_batch is not None:
        # With no valid token the loss is 0 whatever the count (an empty micro-batch); otherwise it divides.
        count = batch.num_items_in_batch  # (a number: a fill on the device, not a host-to-device copy)
        count = count.to(valid.device) if isinstance(count, torch.Tensor) else \
            torch.full((), float(count), dtype=torch.float64, device=valid.device)
        bad["num_items_in_batch"] = valid.any() & ~(torch.isfinite(count) & (count > 0)).reshape(())
    return run_checks([(check_message(name, vocab), bad[name]) for name in CHECKS + TOPK_CHECKS + TORCH_CHECKS
                       if name in bad])
