"""The weights kernel's launch (kernels/token_weights.py): weights, normalization, reduction, the value checks and
the per-token coefficients d loss / d L_i of the fused route, from [N] per-token vectors.

A ``Weighting`` crosses the custom op's schema as plain numbers (``encode_weighting``), field by field in its own
order, and comes back by name (``decode_weighting``): adding a Weighting field changes neither by hand.
``KERNEL_WEIGHTING`` names the fields this kernel implements; a weighting that sets any other runs its weights in
torch (wpkl/engine/route.py reads it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..weighting import POSITION_SCHEDULES, PositionSigmoid, PositionTable, Weighting

LOG2E = 1.4426950408889634
from . import common

WEIGHTS_BLOCK = 512
_REDUCTIONS = {"mean": 0, "sum": 1, "seq_mean": 2, "none": 3}
# The Weighting fields the kernel implements (the route sends any other to the torch weights).
KERNEL_WEIGHTING = ("position", "confidence", "disagreement", "accumulated", "normalize", "accumulated_eps", "w_max")
_SCHEDULE_PARAMETERS = 3  # numbers per position schedule (a PositionTable's values travel as a tensor)
# Derived once (torch.compile traces encode_weighting, and Dynamo does not trace ``dataclasses.fields``).
WEIGHTING_FIELDS = tuple((f.name, f.default) for f in dataclasses.fields(Weighting))
_SCHEDULE_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in POSITION_SCHEDULES}


def _codes(name: str, value) -> list[tuple[str, float]]:
    if name == "position":
        kind = 0 if value is None else 1 + POSITION_SCHEDULES.index(type(value))
        params = [] if value is None or isinstance(value, PositionTable) else [
            float(getattr(value, name)) for name in _SCHEDULE_FIELDS[type(value)]]
        params += [0.0] * (_SCHEDULE_PARAMETERS - len(params))
        return [("position", float(kind))] + [(f"position_{'abc'[i]}", p) for i, p in enumerate(params)]
    if value is None:
        return [(name, math.inf if name == "w_max" else 0.0)]
    if dataclasses.is_dataclass(value):  # an option the kernel does not implement (prefix_confidence): present
        return [(name, 1.0)]
    return [(name, float(value))]


def _names() -> list[str]:
    return [code_name for name, default in WEIGHTING_FIELDS for code_name, _ in _codes(name, default)]


def encode_weighting(weighting: Weighting | None) -> list[float]:
    """A Weighting as plain numbers (what the custom op's schema and the kernel take); ``None`` (uniform) is the
    default Weighting without normalization."""
    weighting = Weighting(normalize=False) if weighting is None else weighting
    return [code for name, _ in WEIGHTING_FIELDS for _, code in _codes(name, getattr(weighting, name))]


def decode_weighting(codes: list[float]) -> dict[str, float]:
    """``encode_weighting``'s numbers by name (position: kind 0 none, else 1 + its index in POSITION_SCHEDULES;
    position_a, position_b, position_c: the schedule's parameters in field order)."""
    names = _names()
    if len(codes) != len(names):
        raise ValueError(f"an encoded weighting has {len(names)} numbers, got {len(codes)}")
    return dict(zip(names, codes, strict=True))


@dataclass
class WeightsOutputs:
    out: torch.Tensor  # [1] the loss, or [N] for "none"
    weight: torch.Tensor  # [N]
    position: torch.Tensor  # [N]
    coef: torch.Tensor  # [N] d loss / d L_i
    flags: torch.Tensor  # [NUM_CHECKS] int32


def weights_launch(valid, divergence, confidence, loss, *, weighting: list[float], table, reduction: str,
                   segments: int, row_length: int, vocab: int, user_weights=None, positions=None, tokens=None,
                   teacher_logprobs=None, rollout_logprobs=None, num_items_in_batch=None,
                   logprob_tolerance: float = 1e-3):
    """(grid, args, meta, outputs) of the weights kernel over flat [N] vectors (kernels/token_weights.py).

    ``weighting``: ``encode_weighting``'s list; ``table``: a PositionTable's values on the device (fp32) or None.
    ``segments``: 0 rows of ``row_length`` tokens, 1 packed input split at each position 0, 2 one sequence."""
    N = valid.numel()
    device = valid.device
    f32 = dict(dtype=torch.float32, device=device)
    scratch = common.new_buffer(4, max(N, 1), **f32)
    segment = common.new_buffer(max(N, 1), dtype=torch.int32, device=device)
    outputs = WeightsOutputs(out=common.new_buffer(N if reduction == "none" else 1, **f32), weight=common.new_buffer(N, **f32),
                             position=common.new_buffer(N, **f32), coef=common.new_buffer(N, **f32),
                             flags=common.new_buffer(8, dtype=torch.int32, device=device))
    code = decode_weighting(weighting)
    kind, pos_a, pos_b, pos_c = (int(code["position"]), code["position_a"], code["position_b"], code["position_c"])
    if kind == 1 + POSITION_SCHEDULES.index(PositionSigmoid):
        pos_c = LOG2E / pos_c  # the kernel's sigmoid is one exp2: 1 / (1 + 2^((center - u) log2(e) / scale))
    confidence_exp, disagreement_exp, gamma = code["confidence"], code["disagreement"], code["accumulated"]
    eps, normalize, w_max = code["accumulated_eps"], code["normalize"], code["w_max"]
    table_len = 1 if table is None else table.numel()
    table = scratch if table is None else table  # a placeholder the kernel does not read
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_mode, num_items_value, num_items_tensor = 2, 0.0, num_items_in_batch.reshape(1)
    elif num_items_in_batch is not None:
        num_items_mode, num_items_value, num_items_tensor = 1, float(num_items_in_batch), scratch
    else:
        num_items_mode, num_items_value, num_items_tensor = 0, 0.0, scratch

    def placeholder(x):
        return scratch if x is None else x.reshape(N)

    args = (
        valid.reshape(N), divergence.reshape(N), confidence.reshape(N), loss.reshape(N),
        placeholder(user_weights), placeholder(positions), placeholder(tokens), placeholder(teacher_logprobs),
        placeholder(rollout_logprobs), table, num_items_tensor,
        outputs.out, outputs.weight, outputs.position, outputs.coef, outputs.flags,
        segment, scratch[0], scratch[1], scratch[2],
        N, max(row_length, 1), vocab, table_len,
        float(pos_a), float(pos_b), float(pos_c), float(confidence_exp), float(disagreement_exp), float(gamma),
        float(eps) if eps > 0 else 1.0, num_items_value, float(logprob_tolerance),
        float(w_max) if math.isfinite(w_max) else 0.0,
    )
    meta = dict(
        SEGMENTS=segments, POSITION=kind, POSITIONS_GIVEN=positions is not None,
        HAS_USER=user_weights is not None,
        CONFIDENCE=confidence_exp > 0, DISAGREEMENT=disagreement_exp > 0, ACCUMULATED=gamma > 0,
        W_MAX=math.isfinite(w_max),
        NORMALIZE=bool(normalize),
        REDUCTION=_REDUCTIONS[reduction], NUM_ITEMS=num_items_mode,
        CHECK_TOKENS=tokens is not None, CHECK_TEACHER_LOGPROBS=teacher_logprobs is not None,
        CHECK_ROLLOUT=rollout_logprobs is not None,
        BLOCK=WEIGHTS_BLOCK, num_warps=4,
    )
    return (1,), args, meta, outputs
