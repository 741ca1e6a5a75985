"""Data-parallel on-policy distillation with wpkl: DDP over ranks, micro-batches, one global token count.

    torchrun --nproc_per_node 2 examples/ddp_distill.py --steps 5      (CPU: gloo; with GPUs: NCCL, one per rank)

Each rank samples its own rollouts (responses of different lengths, so the ranks hold different token counts),
the teacher scores them, and wpkl's loss trains the DDP-wrapped student. Per optimizer step:

1. num_items = wpkl.distributed.global_count(local count): one all-reduce of a scalar, no host sync;
2. each micro-batch's loss is divided by it (num_items_in_batch) and multiplied by the world size before
   backward, because DDP averages the ranks' gradients: the gradient is then the full global batch's, exactly
   as one process holding every rank's sequences would compute it (tests/test_data_parallel.py checks this);
3. all micro-batches but the last run under ``model.no_sync()`` (one gradient all-reduce per step).

The weighting is IW-OPD without normalization (``normalize=False``): per sequence, so exact under data
parallelism. ``normalize=True`` would rescale per micro-batch; docs/recipes.md ("Data parallel") has the global
variant.
"""

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import wpkl
import wpkl.distributed
from wpkl.demo.language import HiddenModeLanguage
from wpkl.demo.model import TinyLM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same models on every rank (DDP also broadcasts rank 0's parameters)
    lang = HiddenModeLanguage(seed=1234)
    length = args.prompt_length + args.new_tokens
    teacher = TinyLM(lang.vocab, d_model=64, layers=2, heads=4, max_length=length).to(device).eval()
    student = TinyLM(lang.vocab, d_model=32, layers=1, heads=2, max_length=length).to(device)
    model = DDP(student, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    weighting = wpkl.Weighting(accumulated=0.5, normalize=False)  # IW-OPD (the authors' weights in [1, 1.5])
    rollout_rng = torch.Generator().manual_seed(1000 + rank)  # every rank its own prompts and rollouts

    for step in range(args.steps):
        # 1. This rank's rollouts for the whole step and their masks (responses stop at a random "EOS").
        micro_batches = []
        for _ in range(args.micro_batches):
            prompts = lang.sample(args.micro_batch_size, args.prompt_length, generator=rollout_rng).to(device)
            seq = student.generate(prompts, args.new_tokens, generator=rollout_rng)
            lengths = torch.randint(1, args.new_tokens + 1, (args.micro_batch_size, 1), generator=rollout_rng)
            mask = (torch.arange(args.new_tokens) < lengths).to(device)
            micro_batches.append((seq, mask))
        # 2. The global batch's valid-token count: one all-reduce of a scalar.
        num_items = wpkl.distributed.global_count(sum(mask.sum() for _, mask in micro_batches))

        optimizer.zero_grad(set_to_none=True)
        local_loss = torch.zeros((), device=device)
        for i, (seq, mask) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else model.no_sync():  # gradients all-reduced once, at the end
                student_logits = model(seq[:, :-1])[:, args.prompt_length - 1:]
                with torch.no_grad():
                    teacher_logits = teacher(seq[:, :-1])[:, args.prompt_length - 1:]
                loss = wpkl.weighted_kl_loss(student_logits, teacher_logits, mask=mask, weighting=weighting,
                                             num_items_in_batch=num_items)
                (loss * world).backward()  # DDP divides the summed gradients by `world`: this undoes it
            local_loss += loss.detach()
        optimizer.step()
        # 3. For logging only: the global batch's loss is the sum of the ranks' shares.
        global_loss = wpkl.distributed.global_sum(local_loss)
        if rank == 0:
            print(f"step {step:3d}  loss {global_loss.item():.4f}  tokens {int(num_items)} over {world} ranks",
                  flush=True)

    # DDP keeps the replicas identical: check it once at the end.
    flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    same = torch.tensor(int(torch.equal(flat, reference)), device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"parameters identical on all {world} ranks: {bool(same)}", flush=True)
    dist.barrier()  # every rank done before any tears the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's worker threads may still be releasing the last collectives' tensors when the interpreter shuts down,
    # which can abort the process ("terminate called without an active exception", torch 2.13, on a busy CPU).
    # Everything is done and printed: leave without the interpreter's teardown (examples/tp_distill.py too).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
