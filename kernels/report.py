"""Kernel resource report: compile every specialization wpkl launches, ahead of time, for sm_80 and sm_90.

    python -m wpkl.kernels.report [--arch 80 90] [--json PATH] [--quick]

Runs on a CPU-only machine: Triton builds PTX and cubin without a GPU, and ``cuobjdump`` (shipped in the
triton wheel) reads registers, shared memory and spill bytes (LOCAL, STACK) off the cubin. The PTX tells
whether global loads are 16 bytes wide. The specializations come from the same launch builders the
autograd Function uses (wpkl/autograd.py), fed [4, 1024, V] meta tensors for each representative V, so
what compiles here is what runs there: the performance signal available without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")
SAMPLED_VARIANTS = ("teacher logits", "teacher logits + rollout", "teacher logprobs", "teacher logprobs + rollout")
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "int64": "i64"}


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd" or "bwd"
    divergence: str
    dtype: str
    vocabs: tuple[int, ...]  # representative V values sharing this specialization; the first is compiled
    arch: int
    variant: str = ""  # "sampled": where log q(y) and the behaviour log p(y) come from


@dataclass
class Row:
    kernel: str
    divergence: str
    variant: str
    dtype: str
    block_v: int
    num_warps: int
    arch: int
    vocabs: str  # the representative V values sharing this specialization
    registers: int
    shared_bytes: int
    local_bytes: int
    stack_bytes: int
    loads_16b: bool

    @property
    def spills(self) -> int:
        return self.local_bytes + self.stack_bytes


def _launch(job: Job):
    """(kernel function, args, meta) exactly as the autograd Function would launch them."""
    import torch

    from wpkl import autograd
    from wpkl import kernels

    dtype = getattr(torch, job.dtype)
    B, T = 4, 1024  # a [B, T, V] batch of N = 4096 tokens
    meta_tensor = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    student, teacher = meta_tensor(B, T, job.vocabs[0]), meta_tensor(B, T, job.vocabs[0])
    valid = meta_tensor(B * T, dt=torch.int8)
    tokens = meta_tensor(B * T, dt=torch.int64) if job.divergence == "sampled" else None
    stats = meta_tensor(kernels.NUM_STATS, B * T, dt=torch.float32)
    per_token = meta_tensor(B * T, dt=torch.float32)
    teacher_logprobs = per_token if "teacher logprobs" in job.variant else None
    rollout = per_token if "rollout" in job.variant else None
    if teacher_logprobs is not None:
        teacher = None
    div_id = autograd.divergence_id(job.divergence, 0.5)
    if job.kernel == "fwd":
        _, args, meta = autograd.forward_launch(student, teacher, valid, tokens, teacher_logprobs, rollout, per_token,
                                                stats, div_id, 0.5, 1.0)
        return kernels.token_divergence_fwd_kernel, args, meta
    grad = meta_tensor(B, T, job.vocabs[0])
    _, args, meta = autograd.backward_launch(student, teacher, valid, tokens, per_token, stats, grad, div_id, 0.5, 1.0)
    return kernels.token_divergence_bwd_kernel, args, meta


def _signature(fn, args, meta):
    """Triton's own specialization rules: pointers and ints divisible by 16 get tt.divisibility=16
    (torch allocations are 16-byte aligned), and an int equal to 1 becomes a constant."""
    constexprs, attrs, signature = dict(meta), {}, {}
    num_warps = constexprs.pop("num_warps")
    # args holds the runtime arguments only: the trailing constexpr names of arg_names come from meta.
    for index, (name, value) in enumerate(zip(fn.arg_names, args, strict=False)):
        if hasattr(value, "dtype"):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).removeprefix("torch.")]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, constexprs, attrs, num_warps


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def compile_job(job: Job) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, meta = _launch(job)
    signature, constexprs, attrs, num_warps = _signature(fn, args, meta)
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options={"num_warps": num_warps})
    usage = _resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return Row(
        kernel=job.kernel, divergence=job.divergence, variant=job.variant, dtype=job.dtype, block_v=constexprs["BLOCK_V"],
        num_warps=num_warps, arch=job.arch, vocabs=" ".join(map(str, job.vocabs)), registers=usage.get("REG", -1),
        shared_bytes=usage.get("SHARED", -1), local_bytes=usage.get("LOCAL", -1), stack_bytes=usage.get("STACK", -1),
        loads_16b=bool(re.search(r"ld\.global(\.[a-z0-9]+)*\.v4\.(b32|u32|f32)", ptx)),
    )


def jobs(archs=ARCHS, quick=False) -> list[Job]:
    """One job per distinct specialization: representative vocabularies sharing one compile once."""
    from wpkl.launch import REPRESENTATIVE_VOCABS, launch_config

    out = []
    for dtype in DTYPES:
        size = 4 if dtype == "float32" else 2
        by_key: dict = {}
        for vocab in REPRESENTATIVE_VOCABS:
            # The launch config and the divisibility of V (Triton's specialization) decide the binary.
            by_key.setdefault((launch_config(vocab, size), vocab % 16 == 0), []).append(vocab)
        groups = sorted(by_key.values(), key=max)
        for vocabs in groups[-1:] if quick else groups:
            for kernel in ("fwd", "bwd"):
                for divergence in DIVERGENCES:
                    # Only the sampled forward reads its teacher and behaviour log-probs in several ways.
                    variants = SAMPLED_VARIANTS if (divergence, kernel) == ("sampled", "fwd") else ("",)
                    out += [Job(kernel, divergence, dtype, tuple(vocabs), arch, variant)
                            for variant in variants for arch in archs]
    return out


def run(archs=ARCHS, quick=False, workers=None, progress=True) -> list[Row]:
    todo = jobs(archs, quick)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(compile_job, todo)
        if progress:
            try:
                from tqdm import tqdm

                results = tqdm(results, total=len(todo), desc="compiling", unit="kernel", file=sys.stderr)
            except ImportError:
                pass
        rows.extend(results)
    return rows


def table(rows: list[Row]) -> str:
    head = "| kernel | divergence | dtype | V | BLOCK_V | warps | arch | regs | smem B | spill B | 16B loads |"
    lines = [head, "|" + "|".join("---" for _ in range(11)) + "|"]
    for r in rows:
        name = f"{r.divergence} ({r.variant})" if r.variant else r.divergence
        lines.append(f"| {r.kernel} | {name} | {r.dtype} | {r.vocabs} | {r.block_v} | {r.num_warps} | "
                     f"sm_{r.arch} | {r.registers} | {r.shared_bytes} | {r.spills} | {'yes' if r.loads_16b else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpkl.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    parser.add_argument("--quick", action="store_true", help="only the largest-vocabulary configuration")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--workers", type=int, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    # Triton 3.9 warns when this is unset; 1 is its current default (FMA contraction on), stated explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    from wpkl.kernels import token_divergence_fwd_kernel

    if type(token_divergence_fwd_kernel).__name__ == "InterpretedFunction":
        # Compiling needs the real JIT functions: start over without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "wpkl.kernels.report", *(argv or sys.argv[1:])], env=env)

    rows = run(args.arch, args.quick, args.workers)
    print(table(rows))
    spilled = [r for r in rows if r.spills]
    print(f"\n{len(rows)} specializations compiled; {len(spilled)} spill; "
          f"{sum(r.loads_16b for r in rows)} use 16-byte global loads.")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
