"""The fused op route: materialized logits on one device with the Triton kernels. The vocabulary pass and the
weights kernel make the loss, the weights and the value checks in two kernels (backward: one), with no host sync,
as a torch custom op (wpkl/backends/ops.py) that torch.compile traces without graph breaks.

The specification is flattened to the op's schema here and only here (quack's rule: flatten at the custom-op
boundary): the weighting as numbers (``encode_weighting``), a PositionTable's values as a tensor, the packing as
a segment mode.
"""

from __future__ import annotations

import math

import torch

from ..backends import ops
from ..backends.weights_kernel import encode_weighting
from ..inputs.data import Problem
from ..weighting import PositionTable, _device_table
from .route import Route
from .weigh import token_stats


def fused_loss(problem: Problem, route: Route):
    spec, batch = problem.spec, problem.batch
    count, tensor_count = batch.num_items_in_batch, None
    if isinstance(count, torch.Tensor):
        tensor_count, count = count.to(problem.device, non_blocking=True).reshape(()), None
    weighting = spec.weighting
    table = None
    if weighting is not None and isinstance(weighting.position, PositionTable):
        table = _device_table(weighting.position.values, problem.device, torch.float32)
    segments = 0 if not batch.packed else (1 if batch.positions is not None else 2)
    loss, stats, weight, position, _ = ops.weighted_loss(
        problem.student.logits, problem.teacher_logits, batch.valid, batch.tokens, problem.teacher_logprobs,
        batch.rollout_logprobs, batch.token_weights, batch.positions, tensor_count, table, spec.divergence,
        spec.beta, spec.temperature, spec.sampled_power, encode_weighting(weighting), spec.reduction, segments,
        math.nan if count is None else float(count), route.inplace)
    if spec.reduction == "none":
        loss = loss.reshape(batch.leading_shape)
    if not spec.return_stats:
        return loss
    # the custom op's outputs all carry its autograd node: token_stats detaches them
    return loss, token_stats(problem, stats[0], weight, stats[1], stats[3], stats[2], position, zeroed=True)
