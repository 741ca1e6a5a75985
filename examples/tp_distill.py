"""Tensor-parallel (vocabulary-parallel) on-policy distillation with wpkl: the lm_head split by vocabulary rows.

    torchrun --nproc_per_node 2 examples/tp_distill.py --steps 3      (CPU: gloo; one GPU per rank: NCCL)

Megatron's column-parallel output layer: rank r of R holds rows [r * V / R, (r + 1) * V / R) of the student's and
the teacher's lm_head weights, and never the [N, V] logits. The trunk (embedding + MLP) is replicated: every
rank runs it on the same batch. Each step, every rank calls

    wpkl.fused_linear_kl_loss(hidden, lm_head_shard, teacher_hidden, teacher_lm_head_shard, ...,
                              process_group=group)

and gets the full vocabulary's loss; backward leaves on the lm_head shard its rows of the full gradient and on
the hidden states the *full* gradient: wpkl all-reduces it over the group itself (the all-reduce Megatron's
column-parallel layer would make in its backward). So the replicated trunk gets the same, complete gradient on
every rank and needs no all-reduce of its own; a model whose lm_head is a Megatron ``ColumnParallelLinear``
(whose backward already all-reduces the input's gradient) would count it twice: give wpkl the hidden states and
the shard's weight, not the layer's output.

The weighting is IW-OPD's (``Weighting(accumulated=0.5, normalize=False)``). At the end, the last step's loss
and gradients (the lm_head slices gathered on rank 0) are checked against one process computing the full
vocabulary, for the fused-linear form and for materialized logits (``weighted_kl_loss`` on the rank's slice of
the logits, sampled-token divergence, global token ids); the script exits non-zero if they differ.
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import wpkl

WEIGHTING = wpkl.Weighting(accumulated=0.5, normalize=False)  # IW-OPD


class Trunk(nn.Module):
    """Everything below the lm_head (replicated on every rank): tokens [B, T] -> hidden states [B, T, H]."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm = nn.LayerNorm(hidden)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.norm(x + self.mlp(x))


def batch(step, args, device):
    """The same batch on every rank (tensor parallelism splits the model, not the data): sequences and a mask of
    responses of random lengths."""
    g = torch.Generator().manual_seed(100 + step)
    seq = torch.randint(0, args.vocab, (args.batch, args.length + 1), generator=g)
    lengths = torch.randint(1, args.length + 1, (args.batch, 1), generator=g)
    mask = torch.arange(args.length) < lengths
    return seq[:, :-1].to(device), seq[:, 1:].to(device), mask.to(device)


def gather_rows(shard, group):
    """[V / R, ...] shards -> [V, ...] (every rank receives it; rank 0 checks)."""
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


def close(actual, expected, what, failures):
    try:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)
    except AssertionError as error:
        failures.append(f"{what}: {str(error).splitlines()[0]} ({str(error).splitlines()[-1].strip()})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=512, help="the whole vocabulary (a multiple of the ranks)")
    args = parser.parse_args(argv)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # NCCL needs one GPU per rank; otherwise gloo on the CPU (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT).
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if cuda else "gloo")
    group = dist.group.WORLD  # the tensor-parallel group: here every rank
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.vocab % world:
        raise SystemExit(f"--vocab {args.vocab} must be a multiple of the {world} ranks (pad the vocabulary)")
    rows = slice(rank * args.vocab // world, (rank + 1) * args.vocab // world)  # this rank's vocabulary rows

    # The same initialization on every rank: the trunks are replicas; each rank keeps its rows of the lm_heads.
    torch.manual_seed(0)
    trunk = Trunk(args.vocab, args.hidden).to(device)
    lm_head = nn.Parameter((torch.randn(args.vocab, args.hidden) / args.hidden ** 0.5)[rows].clone().to(device))
    teacher_trunk = Trunk(args.vocab, 2 * args.hidden).to(device).requires_grad_(False)
    teacher_lm_head = (torch.randn(args.vocab, 2 * args.hidden) * 2 / args.hidden ** 0.5)[rows].clone().to(device)
    initial_trunk = copy.deepcopy(trunk)  # for the final check (its parameters at the last step, below)
    optimizer = torch.optim.SGD([*trunk.parameters(), lm_head], lr=0.5)

    for step in range(args.steps):
        inputs, targets, mask = batch(step, args, device)
        last = step == args.steps - 1
        if last:  # the parameters of the step that is checked
            initial_trunk.load_state_dict(trunk.state_dict())
            lm_head_before = lm_head.detach().clone()
        hidden = trunk(inputs)
        if last:
            hidden.retain_grad()
        with torch.no_grad():
            teacher_hidden = teacher_trunk(inputs)
        loss = wpkl.fused_linear_kl_loss(hidden, lm_head, teacher_hidden, teacher_lm_head, mask=mask,
                                         weighting=WEIGHTING, process_group=group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # lm_head.grad: this rank's rows; hidden's gradient: the full one (wpkl all-reduced it)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.5f}  (vocabulary {args.vocab} over {world} ranks, "
                  f"{args.vocab // world} rows each)", flush=True)
        if last:
            sharded = dict(loss=loss.detach(), hidden=hidden.grad.detach().clone(),
                           lm_head=gather_rows(lm_head.grad, group),
                           trunk={n: p.grad.detach().clone() for n, p in trunk.named_parameters()})
        optimizer.step()

    # Materialized logits: each rank's slice [B, T, V / R] of the student's and teacher's logits.
    logits = (hidden.detach() @ lm_head_before.T).requires_grad_(True)
    teacher_logits = teacher_hidden @ teacher_lm_head.T
    loss_logits = wpkl.weighted_kl_loss(logits, teacher_logits, mask=mask, tokens=targets, divergence="sampled",
                                        weighting=WEIGHTING, process_group=group)
    loss_logits.backward()
    logits_grad = gather_rows(logits.grad.movedim(-1, 0), group).movedim(0, -1)  # [B, T, V]

    # The single-process full-vocabulary computation, on rank 0, from the gathered weights.
    full_lm_head = gather_rows(lm_head_before, group)
    full_teacher_lm_head = gather_rows(teacher_lm_head, group)
    trunk_params = [p.detach().reshape(-1) for p in trunk.parameters()]
    replicas = torch.cat(trunk_params)
    reference_replica = replicas.clone()
    dist.broadcast(reference_replica, 0, group=group)
    ok = torch.ones((), device=device)
    if rank == 0:
        failures = []
        ref_trunk = initial_trunk
        ref_head = full_lm_head.clone().requires_grad_(True)
        ref_hidden = ref_trunk(inputs)
        ref_hidden.retain_grad()
        ref_loss = wpkl.fused_linear_kl_loss(ref_hidden, ref_head, teacher_hidden, full_teacher_lm_head, mask=mask,
                                             weighting=WEIGHTING)
        ref_trunk.zero_grad(set_to_none=True)
        ref_loss.backward()
        close(sharded["loss"], ref_loss.detach(), "fused-linear loss", failures)
        close(sharded["hidden"], ref_hidden.grad, "fused-linear hidden-state gradient", failures)
        close(sharded["lm_head"], ref_head.grad, "fused-linear lm_head gradient (gathered rows)", failures)
        for name, p in ref_trunk.named_parameters():
            close(sharded["trunk"][name], p.grad, f"trunk gradient {name}", failures)

        ref_logits = (ref_hidden.detach() @ full_lm_head.T).requires_grad_(True)
        ref_loss_logits = wpkl.weighted_kl_loss(ref_logits, teacher_hidden @ full_teacher_lm_head.T, mask=mask,
                                                tokens=targets, divergence="sampled", weighting=WEIGHTING)
        ref_loss_logits.backward()
        close(loss_logits.detach(), ref_loss_logits.detach(), "materialized-logits loss", failures)
        close(logits_grad, ref_logits.grad, "materialized-logits gradient (gathered columns)", failures)
        print(f"materialized logits (sampled-token surrogate): loss {loss_logits.item():.5f}, "
              f"single process {ref_loss_logits.item():.5f}", flush=True)
        print(f"last step: loss {sharded['loss'].item():.5f}, single process on the full vocabulary "
              f"{ref_loss.item():.5f}", flush=True)
        for failure in failures:
            print("MISMATCH", failure, flush=True)
        ok.fill_(float(not failures))
    same = torch.tensor(float(torch.equal(replicas, reference_replica)), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN, group=group)
    dist.broadcast(ok, 0, group=group)
    if rank == 0:
        print(f"trunk replicas identical on all {world} ranks: {bool(same)}", flush=True)
        print(f"sharded loss and gradients match one process on the full vocabulary: {bool(ok)}", flush=True)
    dist.barrier(group=group)  # every rank done before any tears the group down
    dist.destroy_process_group()
    return 0 if ok and same else 1


if __name__ == "__main__":
    code = main()
    # gloo's worker threads may still be releasing the last collectives' tensors when the interpreter shuts down,
    # which aborts the process ("terminate called without an active exception": torch 2.13, about one run in five
    # on a busy CPU). Everything is done and printed: leave without the interpreter's teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
