"""Sequence shards: a batch whose sequences are split over the ranks of a ``sequence_group`` (context parallelism,
Ulysses, ring attention), with weights and a reduction that are exactly the whole batch's.

Each rank holds some of the batch's tokens, any of them: a sequence's chunks may sit on any ranks, in any order.
``sequence_ids`` and ``positions`` say where each token sits in the whole batch (wpkl/inputs/layout.py). The
per-token terms need only the rank's own tokens; the weights (positions against the sequence's length, the
accumulated prefix share, prefix-confidence windows that reach into another rank's chunk, normalize's batch sum)
and the reduction's denominators need the whole batch. So, in named stages:

    agree     (``agree_sequences``, before any other work) every rank's row of ``ROW``: its outcome (a rank
              whose inputs were rejected makes every rank raise), its token count, a digest of its options,
              given inputs and ``sequence_bounds``, its largest sequence id, largest and smallest position, and
              ``num_items_in_batch`` (which must agree). Without ``sequence_bounds``: one all-gather of the rows,
              read on the host (the call's one host sync: the largest id and the position span size the layout),
              and every rank raises in step. With ``sequence_bounds=(S, L)`` (every id < S, every position in
              [0, L): ``wpkl.distributed``'s helpers give them) nothing is read: the row travels with the
              exchange and is checked there, raised at once on the CPU and deferred on CUDA
              (wpkl/inputs/checks.py; a rank whose own inputs were rejected joins the exchange, then raises;
              an earlier call's deferred failure is held meanwhile: ``holding_earlier``).
    exchange  (``SequenceShards.reduce``, after the terms) one all-reduce of the whole batch's [S, L] layout of
              ``COLUMNS`` (7 float64 per place: each rank writes its tokens' places, zeros elsewhere, so each sum
              is its one token's value, exactly, in any order); never [N, V] or [N, K] data.
    weigh     every rank checks that no two tokens claim a place and that no sequence has a gap, computes the
              weights with wpkl/reference/weights.py, and the reduction's coefficient of each token,
              d loss / d (w_i L_i), by autograd through wpkl/reference/reduction.py.
    slice     the rank reads its own tokens' places: its loss is sum_i c_i w_i L_i over its tokens
              (``reduction="none"``: w_i L_i), so the ranks' losses sum to the whole batch's loss, and the
              gradient of each rank's loss with respect to its inputs is its rows of the whole gradient.

``sequence_bounds`` must be the same on every rank: they size the exchange, so ranks that differ cannot be told
before it (gloo raises; NCCL may hang). The exchange's bytes are those of the [S, L] layout: the batch's token
count for padded [B, T] batches (Megatron's BSHD), more for packed sequences of very different lengths.

Weights are constants for autograd, so the backward needs no collective. A trainer whose gradient all-reduce
averages over the context-parallel ranks (Megatron's data-and-context-parallel group) multiplies the loss by the
group's size first, as Megatron does for its own loss (docs/recipes.md).
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import torch

from ..inputs.build import sequence_bounds_of
from ..inputs.checks import holding_earlier, run_checks
from ..inputs.data import Problem
from ..inputs.layout import place_checks
from ..reference import compute_weights, reduce_loss, sequence_positions
from .agree import _device


def _dist():
    import torch.distributed as dist

    return dist


# The agreement row each rank contributes: its outcome, what every rank must share, and the bounds of its tokens.
ROW = ("ok", "values ok", "tokens", "digest", "sequences", "largest position", "smallest position",
       "num_items_in_batch")
# The per-place columns of the layout's all-reduce (each place has one token: the sum is that token's value).
COLUMNS = ("count", "valid", "divergence", "confidence", "token weights", "log q(y)", "student entropy")


@dataclass(frozen=True)
class SequenceShards:
    """The agreed facts of a sequence-parallel call: the group, this rank, the whole batch's layout bounds and
    the offset subtracted from the positions. With ``sequence_bounds`` the agreement is not read on the host:
    ``row`` (this rank's, float64 [len(ROW)]) travels with the layout's all-reduce and is checked there."""

    group: object
    rank: int
    world: int
    shape: tuple[int, int]  # (S, L): every sequence id < S, every position - offset in [0, L)
    offset: int = 0
    row: torch.Tensor | None = None

    def places(self, sequence_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Each token's place id * L + (position - offset) in the [S, L] layout; S * L (a slot nobody reads)
        for a token outside the bounds (an error the agreement's row reports)."""
        S, L = self.shape
        ids, column = sequence_ids.reshape(-1), positions.reshape(-1) - self.offset
        inside = (ids >= 0) & (ids < S) & (column >= 0) & (column < L)
        return torch.where(inside, ids * L + column, S * L)

    def reduce(self, local: torch.Tensor | None, places: torch.Tensor | None):
        """One all-reduce: every rank's [n, len(COLUMNS)] values scattered to their places (zeros elsewhere), plus,
        with bounds, the ranks' agreement rows (each in its own slot). Returns ([S, L, len(COLUMNS)], the
        [world, len(ROW)] table or None). ``local=None``: a rank whose inputs were rejected joins with nothing."""
        S, L = self.shape
        width, tail = len(COLUMNS), (0 if self.row is None else self.world * len(ROW))
        device = _device(self.group, None if local is None else local.device)
        buffer = torch.zeros((S * L + 1) * width + tail, dtype=torch.float64, device=device)
        layout = buffer[: (S * L + 1) * width].view(S * L + 1, width)
        if local is not None:
            layout.index_put_((places.to(device),), local.to(device), accumulate=True)
        if self.row is not None:
            buffer[(S * L + 1) * width:].view(self.world, len(ROW))[self.rank] = self.row.to(device)
        _dist().all_reduce(buffer, group=self.group)
        table = None if self.row is None else buffer[(S * L + 1) * width:].view(self.world, len(ROW))
        home = device if local is None else local.device
        return layout[: S * L].view(S, L, width).to(home), table

    def agreement_checks(self, table: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The bounded agreement's checks (module docstring), as flags: raised at once on the CPU, deferred on
        CUDA (wpkl/inputs/checks.py)."""
        column = {name: table[:, i] for i, name in enumerate(ROW)}
        S, L = self.shape
        filled = column["tokens"] > 0
        return [
            ("sequence_group: rank(s) rejected their inputs (their error says why): no rank's loss is valid",
             (column["ok"] == 0).any() | (column["values ok"] == 0).any()),
            ("sequence_group: the ranks disagree on the options, the inputs given, the teacher's form or "
             "sequence_bounds: every rank passes the same options and the same kinds of inputs",
             (column["digest"] != column["digest"][0]).any()),
            ("sequence_group: the ranks pass different num_items_in_batch: it is the whole batch's count (of every "
             "rank of the group), the same on every rank",
             _differ(column["num_items_in_batch"])),
            (f"sequence_bounds ({S}, {L}): a sequence id >= {S} or a position outside [0, {L}); the bounds cover "
             "the whole batch (every rank's tokens)",
             (filled & ((column["sequences"] > S) | (column["largest position"] >= L)
                        | (column["smallest position"] < 0))).any()),
        ]


def _differ(values: torch.Tensor) -> torch.Tensor:
    """Whether the ranks' values differ (NaN equal to NaN: the value checks report a NaN count)."""
    first = values[0]
    return ((values != first) & ~(torch.isnan(values) & torch.isnan(first))).any()


def _digest(problem: Problem) -> int:
    """What every rank must share: the options but the groups, the optional inputs given, the teacher's form, the
    (global) vocabulary and the sequence bounds."""
    facts = (problem.spec.agreement_key(), problem.batch.given(), type(problem.teacher).__name__,
             problem.global_vocab, problem.batch.sequence_bounds)
    return zlib.crc32(repr(facts).encode()) & 0x7FFFFFFF


def _row(problem: Problem | None, error, values_error, device, flags=None) -> torch.Tensor:
    """This rank's agreement row (``ROW``), float64 (every entry exact), on ``device``: made there (a fill per
    host number, device ops for the rest: no host-to-device copy, which would wait for the GPU). ``flags``: the
    value checks' (a tensor, a list of them, or None): deferred on CUDA, they set "values ok" on the device, so
    that a bad value on one rank fails every rank's sync-free agreement."""
    ok = error is None
    row = torch.zeros(len(ROW), dtype=torch.float64, device=device)
    host = (int(ok), int(values_error is None), problem.batch.valid.numel() if ok else 0, _digest(problem) if ok else 0)
    for i, value in enumerate(host):
        if value:
            row[i] = value
    if ok:
        batch = problem.batch
        given = [f for f in (flags if isinstance(flags, list) else [flags]) if f is not None]
        if given and values_error is None:
            row[1] = (~torch.stack([f.bool().any() for f in given]).any()).to(torch.float64)
        if batch.valid.numel():
            pos = batch.positions
            row[4:7] = torch.stack([batch.sequence_ids.max() + 1, pos.max(), pos.min()]).to(device, torch.float64)
        count = batch.num_items_in_batch  # the whole batch's count: the same on every rank
        if isinstance(count, torch.Tensor):
            row[7:] = count.reshape(1).to(device, torch.float64)
        elif count is not None:
            row[7] = float(count)
    return row


def _bounds(raw):
    """The call's ``sequence_bounds`` as (S, L), or None (not given, or not valid: the host agreement then
    reports this rank's error)."""
    if raw is None:
        return None
    try:
        return sequence_bounds_of(raw)
    except ValueError:
        return None


def agree_sequences(group, prepare, check_values, bounds=None):
    """Validate on every rank, then agree (module docstring). ``prepare()`` -> (problem, route);
    ``check_values(problem)`` or None (a vocabulary-parallel ``prepare`` checks the values itself); ``bounds``:
    the call's ``sequence_bounds`` as given. Returns (problem with its ``sequences``, route)."""
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_group needs torch.distributed initialized (init_process_group)")
    error, values_error, problem, route, flags = None, None, None, None, None
    shape = _bounds(bounds)
    # Without a host read, an earlier call's deferred failure is held (its flags arrive on each rank at its own
    # time: raised here, one rank would reject this call alone); the value checks, the only ones of the call that
    # raise earlier failures, run here, inside ``prepare`` (the vocabulary agreement's) or below.
    with holding_earlier() if shape is not None else contextlib.nullcontext():
        try:
            problem, route = prepare()
            if check_values is not None:
                try:
                    flags = check_values(problem)
                except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
                    values_error = e
        except Exception as e:  # noqa: BLE001 - as above
            error = e
    ok = error is None
    device = _device(group, problem.device if ok else None)
    mine = _row(problem, error, values_error, device, flags)
    if shape is not None:  # no host read: the row travels with the layout's all-reduce (one collective)
        shards = SequenceShards(group, dist.get_rank(group), dist.get_world_size(group), shape, 0, mine)
        if error is not None or values_error is not None:
            shards.reduce(None, None)  # the others' layout all-reduce, with nothing from this rank
            raise error if error is not None else values_error
        return problem.replace(sequences=shards), route
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync of the agreement (without sequence_bounds)

    def raise_for(col: int, own):
        failed = [r for r, line in enumerate(table) if not line[col]]
        if failed:
            raise own if own is not None else ValueError(
                f"sequence_group: rank(s) {failed} rejected their inputs (their error says why): no rank computes "
                "this loss")

    raise_for(0, error)
    digests = [int(line[3]) for line in table]
    if len(set(digests)) > 1:
        raise ValueError("sequence_group: the ranks disagree on the options, the inputs given or the teacher's form "
                         f"(digests {digests}): every rank passes the same options and the same kinds of inputs")
    counts = [line[7] for line in table]
    if len({repr(c) for c in counts}) > 1:
        raise ValueError(f"sequence_group: the ranks pass different num_items_in_batch ({counts}): it is the whole "
                         "batch's count (of every rank of the group), the same on every rank")
    raise_for(1, values_error)
    filled = [line for line in table if line[2]]
    low = int(min((line[6] for line in filled), default=0))
    span = int(max((line[5] for line in filled), default=0)) - low + 1
    shape = (int(max(line[4] for line in table)), span)
    shards = SequenceShards(group, dist.get_rank(group), len(table), shape, low)
    return problem.replace(sequences=shards), route


def reject_sequences(group, error: Exception, bounds=None) -> None:
    """An option this rank's specification rejected: join the agreement as a failed rank (so the others raise
    too), then raise ``error``."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized() and isinstance(group, dist.ProcessGroup):
        def prepare():
            raise error

        agree_sequences(group, prepare, None, bounds)
    raise error


class GatheredSequences:
    """The whole batch's weights and reduction coefficients, seen from one rank (module docstring)."""

    def __init__(self, problem: Problem, token_logprobs: torch.Tensor | None):
        self.problem, self.shards = problem, problem.sequences
        self.token_logprobs = token_logprobs
        weighting = problem.spec.weighting
        self.has_entropy = weighting is not None and weighting.needs_student_entropy

    def local(self, divergence: torch.Tensor, confidence: torch.Tensor,
              student_entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_i, c_i w_i, the weights' positions) of this rank's tokens, [B, T] each; c_i = d loss / d (w_i L_i)."""
        spec, batch, shards = self.problem.spec, self.problem.batch, self.shards
        dtype, n = divergence.dtype, batch.valid.numel()
        optional = (batch.token_weights, self.token_logprobs, student_entropy if self.has_entropy else None)
        columns = [torch.ones_like(divergence), batch.valid, divergence.detach(), confidence.detach(),
                   *(torch.zeros_like(divergence) if x is None else x.detach() for x in optional)]
        local = torch.stack([x.reshape(-1).to(torch.float64) for x in columns], dim=1).reshape(n, len(COLUMNS))
        places = shards.places(batch.sequence_ids, batch.positions)
        whole, table = shards.reduce(local, places)  # stage "exchange"
        # stage "weigh": how many tokens claim each place (one, or none), and the layout's checks
        checks = place_checks(whole[..., 0], "tokens (of one or more ranks)")
        if table is not None:
            checks = shards.agreement_checks(table) + checks
        run_checks(checks, raise_earlier=False)  # every rank the same flags; earlier ones: at a later call
        valid = whole[..., 1] > 0.5

        def rows(name: str, given=True) -> torch.Tensor | None:
            return whole[..., COLUMNS.index(name)].to(dtype) if given else None

        positions = sequence_positions(valid)  # counted among the valid tokens, as on one device
        weights = compute_weights(spec.weighting, valid=valid, divergence=rows("divergence"),
                                  confidence=rows("confidence"),
                                  user_weights=rows("token weights", batch.token_weights is not None),
                                  positions=positions,
                                  teacher_token_logprobs=rows("log q(y)", self.token_logprobs is not None),
                                  student_entropy=rows("student entropy", self.has_entropy))
        coefficient = weights
        if spec.reduction != "none":
            items = batch.num_items_in_batch
            # d reduce / d x by autograd through the one reduction (outside inference mode: its tensors are the
            # coefficients' inputs, not the loss's)
            with torch.inference_mode(False), torch.enable_grad():
                mask = valid.clone()
                items = items.clone() if isinstance(items, torch.Tensor) else items
                x = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device, requires_grad=True)
                (r,) = torch.autograd.grad(reduce_loss(x, mask, spec.reduction, items), x)
            coefficient = weights * r.to(dtype)
        inside = places < valid.numel()  # stage "slice": this rank's places (outside the bounds: 0, and an error)
        safe = places.clamp_max(max(valid.numel() - 1, 0))

        def mine(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1)
            taken = flat[safe] if flat.numel() else flat.new_zeros(safe.shape)
            return torch.where(inside, taken, 0).reshape(batch.valid.shape)

        return mine(weights), mine(coefficient), mine(positions)
