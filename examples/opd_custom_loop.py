"""On-policy distillation in a plain PyTorch loop with wpkl (verl-style: micro-batches, global token count).

    python examples/opd_custom_loop.py --steps 30

The student samples continuations, the teacher scores them, and wpkl's weighted loss trains the student.
Each optimizer step accumulates several micro-batches; dividing every micro-batch's loss by the valid-token
count of the whole step (num_items_in_batch; all-reduced across ranks under data parallelism) makes the
accumulated gradient the full batch's. Per-token statistics feed a position-bias monitor. Runs on the CPU in
seconds with the tiny models of `wpkl demo`; on a GPU the same code uses the fused Triton kernels.
"""

import argparse

import torch

import wpkl
from wpkl.audit import PositionBiasMonitor
from wpkl.demo.language import HiddenModeLanguage
from wpkl.demo.model import TinyLM


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--monitor-out", default=None, help="save the position-bias monitor here (.pt)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    lang = HiddenModeLanguage(seed=1234)
    length = args.prompt_length + args.new_tokens
    # In a real run these are your pretrained teacher and student; here an untrained pair keeps it self-contained.
    teacher = TinyLM(lang.vocab, d_model=64, layers=2, heads=4, max_length=length).to(device).eval()
    student = TinyLM(lang.vocab, d_model=32, layers=1, heads=2, max_length=length).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    weighting = wpkl.Weighting(accumulated=0.5, position=wpkl.ExpDecay(args.new_tokens))
    monitor = PositionBiasMonitor(num_buckets=8)

    for step in range(args.steps):
        # 1. Rollouts for the whole step, then their response masks (here every response token counts; with EOS
        #    handling, mask the tokens after it).
        prompts = [lang.sample(args.micro_batch_size, args.prompt_length).to(device) for _ in range(args.micro_batches)]
        rollouts = [student.generate(p, args.new_tokens) for p in prompts]
        masks = [torch.ones(r.shape[0], args.new_tokens, dtype=torch.bool, device=device) for r in rollouts]
        # 2. The step's valid-token count. Under DDP: num_items = wpkl.distributed.global_count(num_items) and
        #    backward loss * world_size (DDP averages gradients); examples/ddp_distill.py is that loop.
        num_items = sum(m.sum() for m in masks)

        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for seq, mask in zip(rollouts, masks, strict=True):
            # Logits predicting the response tokens: a slice of the full logits (no copy is made by wpkl).
            student_logits = student(seq[:, :-1])[:, args.prompt_length - 1:]
            with torch.no_grad():
                teacher_logits = teacher(seq[:, :-1])[:, args.prompt_length - 1:]
            loss, stats = wpkl.weighted_kl_loss(student_logits, teacher_logits, mask=mask, weighting=weighting,
                                                num_items_in_batch=num_items, return_stats=True)
            loss.backward()  # accumulates: the sum over micro-batches is the full batch's mean loss
            monitor.update(stats, step)  # no host sync
            total += loss.item()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {total:.4f}")

    print(monitor.format_table())
    if args.monitor_out:
        print(f"saved {monitor.save(args.monitor_out)}; inspect it with: wpkl audit {args.monitor_out} --out audit/")


if __name__ == "__main__":
    main()
