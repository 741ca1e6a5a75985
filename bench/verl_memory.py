"""Memory of verl's top-k distillation loss with and without wpkl: peak extra bytes of one forward + backward of
the logits processor (``compute_forward_kl_topk``, FSDP strategy) on [1, N, V] logits, over the logits and their
gradient (which every variant allocates).

    python -m bench.verl_memory [--device cuda|cpu] [--tokens 32768 65536] [--vocab 151936] [--dtype bfloat16]

Needs verl 0.9.1 (``pip install "wpkl[verl]"`` in its own environment). Variants: verl's default (a full
[N, V] log-softmax), verl's ``use_chunked_topk`` (chunks of 4096 tokens of float32 logits), and wpkl
(``use_wpkl(topk_mode="verl")``: the same values). On the CPU the peak resident-set delta (bench/measure.py), on
CUDA ``torch.cuda.max_memory_allocated``. Prints a Markdown table; the numbers scale as N x V.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.measure import device_name, peak_extra_bytes  # noqa: E402


def run(variant: str, tokens: int, vocab: int, dtype: torch.dtype, device: str, k: int = 64) -> int | None:
    import verl.trainer.distillation.fsdp.losses as verl_fsdp
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    from wpkl.integrations import verl as wv

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, tokens, vocab, generator=gen, device=device, dtype=dtype).requires_grad_(True)
    # k distinct ids per token (a teacher's top-k never repeats an id; wpkl rejects a list that does)
    ids = (torch.randint(0, vocab, (tokens, 1), generator=gen, device=device) + torch.arange(k, device=device)) % vocab
    lq = -torch.rand(tokens, k, generator=gen, device=device) * 5
    offsets = torch.tensor([0, tokens], device=device)
    nested = [torch.nested.nested_tensor_from_jagged(x, offsets) for x in (lq, ids)]
    config = DistillationConfig(enabled=False, distillation_loss=DistillationLossConfig(
        loss_mode="forward_kl_topk", topk=k, use_policy_gradient=False, use_chunked_topk=variant == "verl chunked"))
    if variant == "wpkl":
        wv.use_wpkl(topk_mode="verl")
    logits.grad = torch.zeros_like(logits)  # every variant's gradient buffer, allocated before the measurement

    def step():
        out = verl_fsdp.compute_forward_kl_topk(logits, *nested, config, "thd")
        out["distillation_losses"].sum().backward()

    try:
        step()  # warm-up (allocator, interpreter)
        return peak_extra_bytes(step, device)
    finally:
        wv.undo()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"# verl top-k loss memory ({device_name(args.device)}, V={args.vocab}, {args.dtype}, fwd+bwd)\n")
    print("| tokens | variant | peak extra MiB | x logits |\n|---|---|---|---|")
    for tokens in args.tokens:
        logits_bytes = tokens * args.vocab * dtype.itemsize
        for variant in ("verl", "verl chunked", "wpkl"):
            peak = run(variant, tokens, args.vocab, dtype, args.device)
            mib = "n/a" if peak is None else f"{peak / 2**20:.0f}"
            ratio = "" if peak is None else f"{peak / logits_bytes:.2f}"
            print(f"| {tokens} | {variant} | {mib} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
