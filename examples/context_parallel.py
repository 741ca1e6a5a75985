"""Context-parallel on-policy distillation with wpkl: each sequence split over the ranks, IW-OPD weights exact.

    torchrun --nproc_per_node 2 examples/context_parallel.py --steps 3     (CPU: gloo; one GPU per rank: NCCL)

Megatron's load-balanced context parallelism: every sequence of the [B, T] batch is cut into 2 * cp chunks and
rank r holds chunks r and 2 * cp - 1 - r (``wpkl.distributed.megatron_bshd`` says which tokens, with their
positions and sequence ids). The model here is position-wise (embedding + position embedding + MLP), so each rank
computes its own tokens' hidden states; a real model's attention would exchange keys and values (ring attention)
and leave the loss as it is here. Each step, every rank calls

    wpkl.fused_linear_kl_loss(hidden, lm_head, teacher_hidden, teacher_lm_head, mask=..., positions=...,
                              sequence_ids=..., weighting=IW-OPD, sequence_group=group,
                              sequence_bounds=mine.bounds)

IW-OPD's weight of a token depends on the divergence of every earlier token of its sequence, most of which sit
on the other rank: with ``sequence_group`` wpkl all-reduces the whole batch's per-token vectors (a few floats
per token) and gives each rank its share of the whole batch's loss; ``sequence_bounds`` (the batch's number of
sequences and length) spares the host sync of its agreement. The gradients are then all-reduced as a data-parallel trainer does
(averaged over the ranks), so the loss is multiplied by the group's size first, as Megatron does for context
parallelism. At the end the last step's loss and gradients are checked against one process on the whole batch
(the script exits non-zero if they differ), and the loss each rank would compute without ``sequence_group``
(weights from its own chunks only: silently wrong) is printed beside it.
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import wpkl
from wpkl.distributed import megatron_bshd

WEIGHTING = wpkl.Weighting(accumulated=0.5, normalize=False)  # IW-OPD: weights from each sequence's prefix


class Trunk(nn.Module):
    """A position-wise model: tokens and positions [..] -> hidden states [.., H]."""

    def __init__(self, vocab: int, length: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(length, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, tokens, positions):
        x = self.embed(tokens) + self.position(positions)
        return self.norm(x + self.mlp(x))


def batch(step, args):
    """The whole batch (the same on every rank): sequences and a mask of responses of random lengths."""
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    lengths = torch.randint(args.length // 2, args.length + 1, (args.batch, 1), generator=g)
    mask = torch.arange(args.length) < lengths
    mask[:, :2] = False  # the prompt
    return tokens, mask


def close(actual, expected, what, failures):
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    except AssertionError as error:
        failures.append(f"{what}: {str(error).splitlines()[0]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32, help="a multiple of 2 * the ranks")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=301)
    args = parser.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    group = dist.group.WORLD  # the context-parallel group: here every rank
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.length % (2 * cp):
        raise SystemExit(f"--length {args.length} must be a multiple of 2 * {cp} ranks")
    mine = megatron_bshd(args.batch, args.length, cp, rank)  # this rank's tokens: [B, T / cp]
    positions, sequence_ids = mine.positions.to(device), mine.sequence_ids.to(device)

    torch.manual_seed(0)  # the same initialization on every rank: the model is replicated
    trunk = Trunk(args.vocab, args.length, args.hidden).to(device)
    lm_head = nn.Parameter((torch.randn(args.vocab, args.hidden) / args.hidden ** 0.5).to(device))
    teacher = Trunk(args.vocab, args.length, 2 * args.hidden).to(device).requires_grad_(False)
    teacher_lm_head = (torch.randn(args.vocab, 2 * args.hidden) * 2 / args.hidden ** 0.5).to(device)
    params = [*trunk.parameters(), lm_head]
    optimizer = torch.optim.SGD(params, lr=0.5)
    before = copy.deepcopy(trunk)

    for step in range(args.steps):
        tokens, mask = batch(step, args)
        local_tokens, local_mask = mine.take(tokens).to(device), mine.take(mask).to(device)
        last = step == args.steps - 1
        if last:
            before.load_state_dict(trunk.state_dict())
            lm_head_before = lm_head.detach().clone()
        hidden = trunk(local_tokens, positions)
        with torch.no_grad():
            teacher_hidden = teacher(local_tokens, positions)
        loss = wpkl.fused_linear_kl_loss(hidden, lm_head, teacher_hidden, teacher_lm_head, mask=local_mask,
                                         positions=positions, sequence_ids=sequence_ids, weighting=WEIGHTING,
                                         sequence_group=group, sequence_bounds=mine.bounds)
        optimizer.zero_grad(set_to_none=True)
        (loss * cp).backward()  # the all-reduce below averages over the cp ranks: undo its 1 / cp
        for p in params:  # what DDP / Megatron's data-and-context-parallel gradient all-reduce does
            dist.all_reduce(p.grad, group=group)
            p.grad /= cp
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)  # the ranks' shares sum to the whole batch's loss
        if rank == 0:
            print(f"step {step:3d}  loss {total.item():.5f}  ({args.batch} sequences of {args.length} tokens over "
                  f"{cp} ranks)", flush=True)
        if last:
            sharded = dict(loss=total, lm_head=lm_head.grad.clone(),
                           trunk={n: p.grad.clone() for n, p in trunk.named_parameters()})
            with torch.no_grad():  # the same call without the group: each rank weighs its own chunks only
                alone = wpkl.fused_linear_kl_loss(hidden, lm_head, teacher_hidden, teacher_lm_head, mask=local_mask,
                                                  positions=positions, weighting=WEIGHTING, reduction="sum")
                count = local_mask.sum().to(alone.dtype)
                dist.all_reduce(alone, group=group)
                dist.all_reduce(count, group=group)
        optimizer.step()

    ok = torch.ones((), device=device)
    if rank == 0:  # one process on the whole batch, from the last step's parameters
        failures = []
        tokens, mask = tokens.to(device), mask.to(device)
        whole_positions = torch.arange(args.length, device=device).expand(args.batch, -1)
        head = lm_head_before.clone().requires_grad_(True)
        ref = wpkl.fused_linear_kl_loss(before(tokens, whole_positions), head,
                                        teacher(tokens, whole_positions), teacher_lm_head, mask=mask,
                                        weighting=WEIGHTING)
        ref.backward()
        close(sharded["loss"], ref.detach(), "loss", failures)
        close(sharded["lm_head"], head.grad, "lm_head gradient", failures)
        for name, p in before.named_parameters():
            close(sharded["trunk"][name], p.grad, f"trunk gradient {name}", failures)
        print(f"last step: loss {sharded['loss'].item():.5f}, one process on the whole batch {ref.item():.5f}, "
              f"each rank weighing only its own chunks {(alone / count).item():.5f}", flush=True)
        for failure in failures:
            print("MISMATCH", failure, flush=True)
        ok.fill_(float(not failures))
    dist.broadcast(ok, 0, group=group)
    if rank == 0:
        print(f"context-parallel loss and gradients match one process on the whole batch: {bool(ok)}", flush=True)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()  # as examples/tp_distill.py: leave without gloo's racy interpreter teardown
    sys.stderr.flush()
    os._exit(code)
