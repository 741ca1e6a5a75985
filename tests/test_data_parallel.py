"""Data parallelism: real DistributedDataParallel on gloo (CPU), R = 2 and 3 ranks, against one process.

A tiny linear model makes the student logits of a global batch of sequences; each rank takes a contiguous
(uneven) share of the sequences, optionally in micro-batches (no_sync on all but the last), and the gradient
DDP leaves on the parameters is compared with the single-process full-batch gradient. One spawn of three
processes runs every case (R = 2 on a subgroup: starting processes and DDP's first use are what cost time); the
parametrized tests then check each case's results.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import wpkl
import wpkl.distributed
from utils import free_port, leave_worker, run_torchrun

ROOT = Path(__file__).resolve().parent.parent
B, T, H, V, V_TEACHER = 7, 6, 8, 33, 36

POSITION_CONFIDENCE = wpkl.Weighting(position=wpkl.ExpDecay(2.0), confidence=1.0, normalize=False)
IW_OPD = wpkl.Weighting(accumulated=0.5, normalize=False)
NORMALIZED = wpkl.Weighting(position=wpkl.ExpDecay(2.0), accumulated=0.5)  # normalize=True (the default)

# name: (weighting, divergence, micro-batches per rank, how the ranks' losses are scaled)
#   "count":      num_items_in_batch = the global valid count, loss * R (Hugging Face Trainer's convention)
#   "count_div":  num_items_in_batch = the global valid count / R, loss as is (TRL DistillationTrainer's)
#   "weights":    normalize=True over the global batch: sum reduction with normalize=False / global weight sum
#   "seq_mean":   reduction="seq_mean" * (local sequences / global sequences) * R
CASES = {
    "uniform": (None, "reverse_kl", 1, "count"),
    "uniform_micro_batches": (None, "reverse_kl", 2, "count"),
    "uniform_count_divided_by_world": (None, "forward_kl", 2, "count_div"),
    "position_confidence_jsd": (POSITION_CONFIDENCE, "jsd", 2, "count"),
    "iw_opd_sampled": (IW_OPD, "sampled", 2, "count"),
    "iw_opd_reverse_kl": (IW_OPD, "reverse_kl", 1, "count"),
    "normalize_global": (NORMALIZED, "reverse_kl", 1, "weights"),
    "normalize_global_micro_batches": (NORMALIZED, "reverse_kl", 2, "weights"),
    "normalize_per_call": (NORMALIZED, "reverse_kl", 2, "count"),
    "seq_mean_global": (None, "reverse_kl", 1, "seq_mean"),
}


def _data():
    """The global batch, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, generator=g)
    teacher = torch.randn(B, T, V_TEACHER, generator=g) * 2
    # Responses of different lengths starting at different offsets; sequence 2 has no valid token.
    start = torch.randint(0, 3, (B, 1), generator=g)
    length = torch.randint(1, T, (B, 1), generator=g)
    t = torch.arange(T)
    mask = (t >= start) & (t < start + length)
    mask[2] = False
    tokens = torch.randint(0, V, (B, T), generator=g)
    torch.manual_seed(1)
    model = torch.nn.Linear(H, V)
    return model, x, teacher, mask, tokens


def _shares(n: int, parts: int) -> list[slice]:
    """Contiguous, uneven shares of n rows (the first ones one row larger)."""
    sizes = [n // parts + (i < n % parts) for i in range(parts)]
    bounds = [sum(sizes[:i]) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def _loss(model, x, teacher, mask, tokens, rows, weighting, divergence, **kwargs):
    return wpkl.weighted_kl_loss(model(x[rows]), teacher[rows], mask=mask[rows], tokens=tokens[rows],
                                 weighting=weighting, divergence=divergence, backend="torch", **kwargs)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _reference(weighting, divergence, mode, calls=None):
    """Single process. ``calls=None``: the full batch in one call; else the given row slices, each a call
    dividing by the full batch's valid count (the per-call semantics of normalize=True)."""
    model, x, teacher, mask, tokens = _data()
    reduction = "seq_mean" if mode == "seq_mean" else "mean"
    if calls is None:
        loss = _loss(model, x, teacher, mask, tokens, slice(None), weighting, divergence, reduction=reduction)
    else:
        loss = sum(_loss(model, x, teacher, mask, tokens, rows, weighting, divergence,
                         num_items_in_batch=mask.sum()) for rows in calls)
    loss.backward()
    return loss.detach(), _grads(model)


def _run_case(rank, world, group, weighting, divergence, micro, mode):
    model, x, teacher, mask, tokens = _data()
    ddp = DDP(copy.deepcopy(model), process_group=group)
    share = _shares(B, world)[rank]
    rows = [slice(share.start + s.start, share.start + s.stop) for s in _shares(share.stop - share.start, micro)]
    local_mask = mask[share]
    local_weighting = weighting
    if mode == "weights":
        local_weighting = dataclasses.replace(weighting, normalize=False)
    num_items = wpkl.distributed.global_count(local_mask, group)  # one all-reduce for the whole step
    if mode == "count_div":
        num_items = num_items / world
    if mode == "seq_mean":
        local_sequences = local_mask.any(-1).sum()
        global_sequences = wpkl.distributed.global_count(local_sequences, group)
    local_loss, local_weight = torch.zeros(()), torch.zeros(())
    for i, r in enumerate(rows):
        with ddp.no_sync() if i < len(rows) - 1 else nullcontext():
            if mode in ("count", "count_div"):
                loss = _loss(ddp, x, teacher, mask, tokens, r, local_weighting, divergence, num_items_in_batch=num_items)
                # "count_div": the rank's loss is R times its share of the global loss (same gradient).
                local_loss += loss.detach() if mode == "count" else loss.detach() / world
                (loss * world if mode == "count" else loss).backward()
            elif mode == "weights":
                loss, stats = _loss(ddp, x, teacher, mask, tokens, r, local_weighting, divergence, reduction="sum",
                                    return_stats=True)
                local_loss += loss.detach()
                local_weight += stats.weight.sum()
                if len(rows) == 1:  # the whole share in one call: divide before backward
                    loss = loss / wpkl.distributed.global_weight_sum(stats.weight, group)
                (loss * world).backward()
            else:  # seq_mean
                loss = _loss(ddp, x, teacher, mask, tokens, r, local_weighting, divergence, reduction="seq_mean")
                loss = loss * local_sequences / global_sequences
                local_loss += loss.detach()
                (loss * world).backward()
    if mode == "weights":
        total = wpkl.distributed.global_weight_sum(local_weight, group)
        if len(rows) > 1:  # micro-batches: the weights of later ones were unknown; the gradient is linear in 1/W
            for p in ddp.parameters():
                p.grad.div_(total)
        local_loss = local_loss / total
    global_loss = wpkl.distributed.global_sum(local_loss, group)  # what a trainer logs: the global batch's loss
    return global_loss, _grads(ddp.module)


def _worker(rank, port, out):
    """Three ranks; the R = 2 cases run on a subgroup of ranks 0 and 1 (one spawn: DDP's first use costs seconds
    of imports per process)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        pair = dist.new_group([0, 1])  # collective: every rank calls it
        results = {}
        for world, group in ((2, pair), (3, None)):
            if rank >= world:
                continue
            results[world] = {name: _run_case(rank, world, group, *case) for name, case in CASES.items()}
            # Every rank holds the same gradient (DDP's all-reduce): compare with rank 0's.
            flat = torch.cat([grad for _, grad in results[world].values()])
            reference = flat.clone()
            dist.broadcast(reference, 0, group=group)
            results[world]["_ranks_agree"] = bool(torch.equal(reference, flat))
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # nothing in flight when the ranks tear down gloo (rank 0 hosts the store: it leaves last)
    finally:
        dist.destroy_process_group()
    leave_worker()


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=3, join=True)
    return torch.load(out)


@pytest.fixture(params=[2, 3], ids=lambda r: f"R{r}")
def ddp_results(request, all_results):
    return dict(all_results[request.param], _world=request.param)


def test_ranks_hold_the_same_gradient(ddp_results):
    assert ddp_results["_ranks_agree"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "normalize_per_call"])
def test_ddp_gradient_equals_full_batch(ddp_results, case):
    """Summed over ranks (DDP's average times R), the gradient is the single-process full-batch gradient,
    and the all-reduced loss is the full batch's loss."""
    weighting, divergence, _, mode = CASES[case]
    loss, grad = ddp_results[case]
    want_loss, want_grad = _reference(weighting, divergence, mode)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)


def test_normalize_true_is_per_call(ddp_results):
    """``normalize=True`` inside the loss rescales the weights to mean 1 over each call's (rank's micro-batch's)
    valid tokens: DDP with the global count gives exactly the single-process sum of those calls, which is not
    the full batch's normalized loss (use ``global_weight_sum`` for that)."""
    world = ddp_results["_world"]
    weighting, divergence, micro, mode = CASES["normalize_per_call"]
    calls = [slice(share.start + s.start, share.start + s.stop) for share in _shares(B, world)
             for s in _shares(share.stop - share.start, micro)]
    loss, grad = ddp_results["normalize_per_call"]
    want_loss, want_grad = _reference(weighting, divergence, mode, calls=calls)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _, full_grad = _reference(weighting, divergence, mode)
    assert not torch.allclose(grad, full_grad, rtol=1e-3, atol=1e-5)


def test_global_helpers_in_one_process():
    """The helpers are plain sums in a one-rank group; wrong input is refused."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        mask = torch.tensor([[True, False, True], [False, False, True]])
        assert wpkl.distributed.global_count(mask).item() == 3
        assert wpkl.distributed.global_count(torch.tensor(5)).item() == 5
        assert wpkl.distributed.global_weight_sum(torch.zeros(2, 3)).item() == 1.0  # all-zero weights: loss 0
        weights = torch.tensor([0.5, 1.5], requires_grad=True)
        total = wpkl.distributed.global_weight_sum(weights)
        assert total.item() == 2.0 and not total.requires_grad
        x = torch.ones(2)
        assert wpkl.distributed.global_sum(x) is not x
        with pytest.raises(TypeError):
            wpkl.distributed.global_count(3)
        with pytest.raises(ValueError):
            wpkl.distributed.global_count(torch.ones(2))
        with pytest.raises(TypeError):
            wpkl.distributed.global_weight_sum(torch.ones(2, dtype=torch.int64))
    finally:
        dist.destroy_process_group()


def test_torchrun_example():
    """examples/ddp_distill.py under torchrun with 2 CPU ranks (gloo)."""
    result = run_torchrun("examples/ddp_distill.py", "--steps", "2")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step   1  loss" in result.stdout, result.stdout
    assert "parameters identical on all 2 ranks: True" in result.stdout, result.stdout
