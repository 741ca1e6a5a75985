"""Sequence shards: a batch whose sequences are split over the ranks of a ``sequence_group`` (context parallelism,
Ulysses, ring attention), with weights and a reduction that are exactly the whole batch's.

Each rank holds some of the batch's tokens, any of them: a sequence's chunks may sit on any ranks, in any order.
``sequence_ids`` and ``positions`` say where each token sits in the whole batch (wpkl/inputs/layout.py). The
per-token terms need only the rank's own tokens; the weights (positions against the sequence's length, the
accumulated prefix share, prefix-confidence windows that reach into another rank's chunk, normalize's batch sum)
and the reduction's denominators need the whole batch. So, in named stages around the two collectives:

    agree     (``agree_sequences``, before any other work) one all-gather of eight int64 per rank: every rank's
              outcome (a rank whose inputs were rejected makes every rank raise), its token count, a digest of
              its options and given inputs, its largest sequence id, largest and smallest position, and
              ``num_items_in_batch`` (which must agree); the call's one host sync
              (the counts size the gather, the largest id and position the layout).
    gather    (``GatheredSequences.local``, after the terms) one all-gather of the rank's per-token vectors
              (sequence id, position, mask, detached divergence and confidence, and the token weights, log q(y)
              and the student's entropy when needed): 5 to 8 float64 per token, never [N, V] or [N, K] data.
    weigh     every rank lays the whole batch out ([S, L], checking that no two tokens claim one place and that
              no sequence has a gap), computes its weights with wpkl/reference/weights.py, and the reduction's
              coefficient of each token, d loss / d (w_i L_i), by autograd through wpkl/reference/reduction.py.
    slice     the rank keeps its own tokens' weights and coefficients: its loss is sum_i c_i w_i L_i over its
              tokens (``reduction="none"``: w_i L_i), so the ranks' losses sum to the whole batch's loss, and
              the gradient of each rank's loss with respect to its inputs is its rows of the whole gradient.

Weights are constants for autograd, so the backward needs no collective. A trainer whose gradient all-reduce
averages over the context-parallel ranks (Megatron's data-and-context-parallel group) multiplies the loss by the
group's size first, as Megatron does for its own loss (docs/recipes.md).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from ..inputs.checks import run_checks
from ..inputs.data import Problem
from ..inputs.layout import SequenceLayout
from ..reference import compute_weights, reduce_loss, sequence_positions
from .agree import _device


def _dist():
    import torch.distributed as dist

    return dist


@dataclass(frozen=True)
class SequenceShards:
    """The agreed facts of a sequence-parallel call: the group, every rank's token count and this rank."""

    group: object
    sizes: tuple[int, ...]
    rank: int
    shape: tuple[int, int]  # bounds of the whole batch's layout: S > every sequence id, L > every position span

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """[n_rank, k] on every rank -> [sum(n), k], in rank order (one all-gather, padded to the largest n)."""
        dist, width = _dist(), max(self.sizes)
        device = _device(self.group, local.device)
        padded = torch.zeros((width, local.shape[1]), dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local.to(device)
        gathered = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:n] for g, n in zip(gathered, self.sizes, strict=True)]).to(local.device)


def _digest(problem: Problem) -> int:
    """What every rank must share: the options but the groups, the optional inputs given, the teacher's form and
    the (global) vocabulary."""
    facts = (problem.spec.agreement_key(), problem.batch.given(), type(problem.teacher).__name__,
             problem.global_vocab)
    return zlib.crc32(repr(facts).encode()) & 0x7FFFFFFF


def agree_sequences(group, prepare, check_values):
    """Validate on every rank, then agree (module docstring). ``prepare()`` -> (problem, route);
    ``check_values(problem)`` or None (a vocabulary-parallel ``prepare`` checks the values itself). Returns
    (problem with its ``sequences``, route)."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_group needs torch.distributed initialized (init_process_group)")
    error, values_error, problem, route = None, None, None, None
    try:
        problem, route = prepare()
        if check_values is not None:
            try:
                check_values(problem)
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
                values_error = e
    except Exception as e:  # noqa: BLE001 - as above
        error = e
    ok = error is None
    row = [int(ok), int(values_error is None), problem.batch.valid.numel() if ok else 0,
           _digest(problem) if ok else 0, 0, 0, 0, 0]
    mine = torch.tensor(row, dtype=torch.int64, device=_device(group, problem.device if ok else None))
    if ok:  # device ops, read with the table: no extra sync
        batch = problem.batch
        if batch.valid.numel():
            pos = batch.positions
            mine[4:7] = torch.stack([batch.sequence_ids.max() + 1, pos.max(), pos.min()]).to(mine.device)
        if batch.num_items_in_batch is not None:  # the whole batch's count: the same on every rank
            count = torch.as_tensor(batch.num_items_in_batch, dtype=torch.float64).reshape(1)
            mine[7:] = count.to(mine.device).view(torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync of the agreement

    def raise_for(col: int, own):
        failed = [r for r, line in enumerate(table) if not line[col]]
        if failed:
            raise own if own is not None else ValueError(
                f"sequence_group: rank(s) {failed} rejected their inputs (their error says why): no rank computes "
                "this loss")

    raise_for(0, error)
    digests = [line[3] for line in table]
    if len(set(digests)) > 1:
        raise ValueError("sequence_group: the ranks disagree on the options, the inputs given or the teacher's form "
                         f"(digests {digests}): every rank passes the same options and the same kinds of inputs")
    counts = {line[7] for line in table}
    if len(counts) > 1:
        values = [torch.tensor(line[7]).view(torch.float64).item() for line in table]
        raise ValueError(f"sequence_group: the ranks pass different num_items_in_batch ({values}): it is the whole "
                         "batch's count (of every rank of the group), the same on every rank")
    raise_for(1, values_error)
    filled = [line for line in table if line[2]]
    span = max((line[5] for line in filled), default=0) - min((line[6] for line in filled), default=0) + 1
    shape = (max(line[4] for line in table), span)
    shards = SequenceShards(group, tuple(line[2] for line in table), dist.get_rank(group), shape)
    return problem.replace(sequences=shards), route


def reject_sequences(group, error: Exception) -> None:
    """An option this rank's specification rejected: join the agreement as a failed rank (so the others raise
    too), then raise ``error``."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized() and isinstance(group, dist.ProcessGroup):
        def prepare():
            raise error

        agree_sequences(group, prepare, None)
    raise error


class GatheredSequences:
    """The whole batch's weights and reduction coefficients, seen from one rank (module docstring)."""

    def __init__(self, problem: Problem, token_logprobs: torch.Tensor | None):
        batch = problem.batch
        self.problem, self.shards = problem, problem.sequences
        self.base = [batch.sequence_ids, batch.positions, batch.valid]
        self.extra = [x for x in (batch.token_weights, token_logprobs) if x is not None]
        self.has_weights, self.has_logprobs = batch.token_weights is not None, token_logprobs is not None
        weighting = problem.spec.weighting
        self.has_entropy = weighting is not None and weighting.needs_student_entropy

    def local(self, divergence: torch.Tensor, confidence: torch.Tensor,
              student_entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_i, c_i w_i, the weights' positions) of this rank's tokens, [B, T] each; c_i = d loss / d (w_i L_i)."""
        spec, batch = self.problem.spec, self.problem.batch
        dtype = divergence.dtype
        entropy = [student_entropy.detach()] if self.has_entropy else []
        columns = [*self.base, divergence.detach(), confidence.detach(), *self.extra, *entropy]
        local = torch.stack([x.reshape(-1).to(torch.float64) for x in columns], dim=1)
        whole = self.shards.gather(local)  # stage "gather"
        ids, pos = whole[:, 0].long(), whole[:, 1].long()
        layout = SequenceLayout.by_ids(ids, pos, what="tokens (of one or more ranks)",  # stage "weigh"
                                       shape=self.shards.shape)
        run_checks(layout.checks, raise_earlier=False)  # every rank the same flags; earlier ones: next agreement
        valid = layout.rows(whole[:, 2].bool())

        def rows(col: int) -> torch.Tensor:
            return layout.rows(whole[:, col].to(dtype))

        extra = iter(range(5, whole.shape[1]))
        user_weights = rows(next(extra)) if self.has_weights else None
        token_logprobs = rows(next(extra)) if self.has_logprobs else None
        entropy_rows = rows(next(extra)) if self.has_entropy else None
        positions = sequence_positions(valid)  # counted among the valid tokens, as on one device
        weights = compute_weights(spec.weighting, valid=valid, divergence=rows(3), confidence=rows(4),
                                  user_weights=user_weights, positions=positions,
                                  teacher_token_logprobs=token_logprobs, student_entropy=entropy_rows)
        coefficient = weights
        if spec.reduction != "none":
            count = batch.num_items_in_batch
            # d reduce / d x by autograd through the one reduction (outside inference mode: its tensors are the
            # coefficients' inputs, not the loss's)
            with torch.inference_mode(False), torch.enable_grad():
                mask = valid.clone()
                count = count.clone() if isinstance(count, torch.Tensor) else count
                x = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device, requires_grad=True)
                (r,) = torch.autograd.grad(reduce_loss(x, mask, spec.reduction, count), x)
            coefficient = weights * r.to(dtype)
        start, n = self.shards.offset, batch.valid.numel()  # stage "slice"

        def mine(x: torch.Tensor) -> torch.Tensor:
            return layout.tokens(x).reshape(-1)[start: start + n].reshape(batch.valid.shape)

        return mine(weights), mine(coefficient), mine(positions)
