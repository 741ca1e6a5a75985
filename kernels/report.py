"""Kernel resource report: compile every specialization wpkl launches, ahead of time, for sm_80 and sm_90.

    python -m wpkl.kernels.report [--arch 80 90] [--json PATH] [--sass-dir DIR] [--quick]

Runs on a CPU-only machine: Triton builds PTX and cubin without a GPU, and ``cuobjdump`` (shipped in the
triton wheel) reads registers, shared memory and spill bytes (LOCAL, STACK) off the cubin and disassembles it.
The specializations come from the same launch builders the package uses (wpkl/vocab_pass.py), fed
contiguous [4, 1024, V] meta tensors for each representative V, so what compiles here is what runs there.

What it measures, per specialization and architecture:

- The vocabulary loops, in the SASS: every loop (a backward branch and the instructions from its target to
  it) whose body holds a global load without a guard predicate, i.e. the unmasked loop over aligned blocks
  (the forward kernel has one, two for jsd; the backward kernel one). A loop nested in another counts
  only if no inner loop holds such a load.
- Instructions per element: the loop body's SASS instructions divided by the vocabulary columns one thread
  handles per iteration, BLOCK_V / (32 num_warps). In the forward kernel a column is a student/teacher
  pair. This is issue work: each of an SM's 4 schedulers issues at most one warp instruction per clock, so
  at a given bandwidth it bounds the instructions a column may take (docs/design.md turns it into an
  expected fraction of the copy bandwidth).
- BAR (barriers) and SHFL (warp shuffles) inside those loops: none, by design (reductions across threads
  happen once per row); MUFU (exp2/log2) for information.
- 16-byte accesses: every global load in the vocabulary loops is LDG.E.128 (and every store, the backward's
  gradient, STG.E.128).
- Registers, shared memory and spill bytes (cuobjdump: LOCAL + STACK), and resident CTAs per SM: registers are
  allocated per warp in units of 256 from each of the 4 sub-partitions' 16384, at most 64 warps and 32 CTAs
  per SM, and shared memory per CTA (plus 1 KiB the system reserves) from 228 KiB (sm_90) or 164 KiB (sm_80).

``--sass-dir DIR`` writes each specialization's disassembly as ``<kernel>-<divergence>-<dtype>-V<vocab>-
sm_<arch>.sass`` (one file per representative V: vocabularies that share a specialization share its code)
and ``report.json`` beside them. The gates (``gate_failures``, run by tests/test_aot_compile.py, and this
command's exit status) hold the targets of docs/design.md for the Triton that is installed.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "sampled")
SAMPLED_VARIANTS = ("teacher logits", "teacher logits + rollout", "teacher logprobs", "teacher logprobs + rollout")
WEIGHTS_REDUCTIONS = ("mean", "sum", "seq_mean", "none")
TOPK_SIZES = (64, 100)  # a power of two, and a K whose block is masked
TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "int32": "i32", "int64": "i64"}

# Per-SM limits for the occupancy estimate.
REGISTERS_PER_SUBPARTITION = 16384
SUBPARTITIONS = 4
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_CTA = 1024

# Targets (docs/design.md), gated for bf16 on sm_90 at V = 128256, the specialization they name.
TARGET_VOCAB = 128256
TARGET_INSTRUCTIONS = {  # (kernel, divergence, loop index) -> max SASS instructions per element
    ("fwd", "reverse_kl", 0): 32,
    ("fwd", "forward_kl", 0): 32,
    ("fwd", "jsd", 1): 40,  # jsd's second pass
    ("bwd", "reverse_kl", 0): 24,
    ("bwd", "forward_kl", 0): 24,
    ("bwd", "jsd", 0): 40,
}
TARGET_FORWARD_CTAS = 3
LOADS_16B_VOCABS = (32000, 128256, 151665, 151936, 262144)


@dataclass(frozen=True)
class Job:
    kernel: str  # "fwd", "bwd", "weights" or "topk"
    divergence: str  # the weights kernel: its reduction
    dtype: str
    vocabs: tuple[int, ...]  # representative V values sharing this specialization; the first is compiled
    arch: int
    variant: str = ""  # "sampled": where log q(y) and the behaviour log p(y) come from


@dataclass
class Loop:
    instructions: int
    per_element: float  # instructions / (BLOCK_V / threads)
    bar: int
    shfl: int
    mufu: int
    loads: int
    loads_16b: int
    stores: int
    stores_16b: int


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
    ctas_per_sm: int
    loops: list[Loop] = field(default_factory=list)
    sass: str = ""  # the disassembly (written by --sass-dir, left out of the JSON rows)

    @property
    def spills(self) -> int:
        return self.local_bytes + self.stack_bytes

    @property
    def loads_16b(self) -> bool:
        """Every global load in the vocabulary loops is 16 bytes wide (and there is a loop)."""
        return bool(self.loops) and all(loop.loads == loop.loads_16b > 0 for loop in self.loops)

    @property
    def stores_16b(self) -> bool:
        """Every global store in the vocabulary loops is 16 bytes wide (the backward kernel's gradient)."""
        return all(loop.stores == loop.stores_16b for loop in self.loops)

    @property
    def name(self) -> str:
        """The divergence, with the sampled forward's variant: reverse_kl, sampled_teacher_logprobs_rollout."""
        return "_".join([self.divergence, *self.variant.replace("+", " ").split()])

    def record(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "sass"}
        out.update(name=self.name, spill_bytes=self.spills, loads_16b=self.loads_16b, stores_16b=self.stores_16b)
        return out


def _launch(job: Job):
    """(kernel function, args, meta) exactly as the package launches them."""
    import torch

    from wpkl import vocab_pass as autograd
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
    if job.kernel == "weights":  # the [N] weights kernel: the reduction in ``divergence``, every option on
        N = B * T
        f32 = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        table = f32(8) if "table" in job.variant else None
        code = [3.0 if table is not None else 4.0, 0.25, 0.75, 1.0, 0.5, 0.5, 1e-8, 1.0, 1.5]
        _, args, meta, _ = autograd.weights_launch(
            f32(N, dt=torch.int8), f32(N), f32(N), f32(N), weighting=code, table=table, reduction=job.divergence,
            segments=1 if "packed" in job.variant else 0, row_length=T, vocab=job.vocabs[0], user_weights=f32(N),
            positions=f32(N, dt=torch.int64), tokens=f32(N, dt=torch.int64), teacher_logprobs=f32(N),
            rollout_logprobs=f32(N), num_items_in_batch=f32(1) if job.divergence == "mean" else None)
        return kernels.token_weights_kernel, args, meta
    if job.kernel == "topk":  # the top-k teacher's atom fix-up (kernels/token_topk.py): K in ``variant``
        K = int(job.variant.removeprefix("K="))
        N = B * T
        f32 = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
        grad = meta_tensor(B, T, job.vocabs[0])
        args = (f32(N, K, dt=torch.int64), f32(N, K), f32(N, K), stats, f32(N), valid, grad, N, K, T, job.vocabs[0],
                grad.stride(0), grad.stride(1), 1.0)
        return kernels.topk_atoms_bwd_kernel, args, autograd.topk_atoms_meta(K)
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


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes) -> dict[str, int]:
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    return {k: int(v) for k, v in fields.items()}


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_GUARD = re.compile(r"^@!?U?P[0-9T]+\s+")


def parse_sass(sass: str) -> list[tuple[int, bool, str, str]]:
    """(address, guarded, opcode, text) of every instruction of a cuobjdump -sass listing."""
    out = []
    for line in sass.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            text = match.group(2)
            guard = _GUARD.match(text)
            body = text[guard.end():] if guard else text
            out.append((int(match.group(1), 16), bool(guard), body.split()[0], text))
    return out


def vocabulary_loops(sass: str, elements_per_iteration: int) -> list[Loop]:
    """The vocabulary loops of a kernel (see the module docstring), in address order, measured."""
    instructions = parse_sass(sass)
    candidates = []
    for address, _, opcode, text in instructions:
        target = re.search(r"\bBRA\b.*?\b0x([0-9a-f]+)\b", text) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) <= address:
            body = [i for i in instructions if int(target.group(1), 16) <= i[0] <= address]
            if any(op.startswith("LDG") and not guarded for _, guarded, op, _ in body):
                candidates.append((int(target.group(1), 16), address, body))
    innermost = [c for c in candidates if not any(o is not c and c[0] <= o[0] and o[1] <= c[1] for o in candidates)]
    loops = []
    for _, _, body in sorted(innermost, key=lambda c: c[0]):
        ops = [op for _, _, op, _ in body]
        loads = [op for op in ops if op.startswith("LDG")]
        stores = [op for op in ops if op.startswith("STG")]
        loops.append(Loop(instructions=len(body), per_element=round(len(body) / elements_per_iteration, 2),
                          bar=sum(op.startswith("BAR") for op in ops), shfl=sum(op.startswith("SHFL") for op in ops),
                          mufu=sum(op.startswith("MUFU") for op in ops), loads=len(loads),
                          loads_16b=sum(".128" in op for op in loads), stores=len(stores),
                          stores_16b=sum(".128" in op for op in stores)))
    return loops


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident CTAs per SM allowed by registers, warps and shared memory (see the module docstring)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = SUBPARTITIONS * (REGISTERS_PER_SUBPARTITION // per_warp)
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED_PER_CTA)
    return min(MAX_CTAS_PER_SM, warps_by_registers // num_warps, MAX_WARPS_PER_SM // num_warps, by_shared)


def compile_job(job: Job) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, meta = _launch(job)
    signature, constexprs, attrs, num_warps = _signature(fn, args, meta)
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options={"num_warps": num_warps})
    cubin = compiled.asm["cubin"]
    usage = _resources(cubin)
    sass = _cuobjdump(cubin, "-sass")
    registers, shared = usage.get("REG", -1), usage.get("SHARED", -1)
    block_v = constexprs.get("BLOCK_V", constexprs.get("BLOCK", constexprs.get("BLOCK_K")))
    return Row(
        kernel=job.kernel, divergence=job.divergence, variant=job.variant, dtype=job.dtype, block_v=block_v,
        num_warps=num_warps, arch=job.arch, vocabs=" ".join(map(str, job.vocabs)), registers=registers,
        shared_bytes=shared, local_bytes=usage.get("LOCAL", -1), stack_bytes=usage.get("STACK", -1),
        ctas_per_sm=ctas_per_sm(registers, num_warps, shared, job.arch),
        loops=[] if job.kernel in ("weights", "topk") else vocabulary_loops(sass, max(1, block_v // (32 * num_warps))),
        sass=sass,
    )


def jobs(archs=ARCHS, quick=False) -> list[Job]:
    """One job per distinct specialization: representative vocabularies sharing one compile once.

    ``quick``: the large vocabularies (V >= 32000), which include every specialization the gates name, and
    bf16 at V = 97 (one block longer than the vocabulary, one warp).
    """
    from wpkl.launch import REPRESENTATIVE_VOCABS, launch_config

    out = []
    for dtype in DTYPES:
        size = 4 if dtype == "float32" else 2
        by_key: dict = {}
        for vocab in REPRESENTATIVE_VOCABS:
            if quick and vocab < 32000 and (dtype, vocab) != ("bfloat16", 97):
                continue
            # The launch config and Triton's specialization of V (divisible by 16, or equal to 1) decide the binary.
            by_key.setdefault((launch_config(vocab, size), vocab % 16 == 0, vocab == 1), []).append(vocab)
        if dtype == "float32":  # the weights kernel works on float32 [N] vectors whatever the logits' dtype
            out += [Job("weights", reduction, dtype, (32000,), arch, variant) for reduction in WEIGHTS_REDUCTIONS
                    for variant in ("window", "packed table") for arch in archs]
        # A top-k teacher: the forward and dense backward are the "sampled" specializations below (no teacher
        # logits, token -1); the atoms' fix-up writes the gradient's dtype at K ids.
        out += [Job("topk", "atoms", dtype, (151936,), arch, f"K={K}") for K in TOPK_SIZES for arch in archs]
        for vocabs in sorted(by_key.values(), key=max):
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


def gate_failures(rows: list[Row]) -> list[str]:
    """Every target the rows miss, as readable lines (empty: all gates pass)."""
    failures = []
    for r in rows:
        where = f"{r.kernel} {r.name} {r.dtype} V={r.vocabs} sm_{r.arch}"
        if r.spills:
            failures.append(f"{where}: spills {r.spills} bytes")
        if r.kernel in ("weights", "topk"):  # [N] or [N, K] vectors, no vocabulary loop: no spills is the gate
            continue
        vocabs = {int(v) for v in r.vocabs.split()}
        if not r.loops and min(vocabs) >= r.block_v:  # (V = 1 is a constant: its compiled loop runs 0 times)
            failures.append(f"{where}: no vocabulary loop found in the SASS")
        for i, loop in enumerate(r.loops):
            if loop.bar or loop.shfl:
                failures.append(f"{where}: loop {i} has {loop.bar} BAR and {loop.shfl} SHFL")
        if vocabs & set(LOADS_16B_VOCABS) and not (r.loads_16b and r.stores_16b):
            failures.append(f"{where}: vocabulary loop loads or stores are not all 16 bytes wide")
        if (r.dtype, r.arch) != ("bfloat16", 90) or TARGET_VOCAB not in vocabs or r.variant:
            continue
        for (kernel, divergence, index), limit in TARGET_INSTRUCTIONS.items():
            if (kernel, divergence) == (r.kernel, r.divergence):
                if index >= len(r.loops):
                    failures.append(f"{where}: vocabulary loop {index} not found")
                elif r.loops[index].per_element > limit:
                    failures.append(f"{where}: loop {index} takes {r.loops[index].per_element} instructions per "
                                    f"element, target {limit}")
        if r.kernel == "fwd" and r.divergence in ("reverse_kl", "forward_kl", "jsd") and \
                r.ctas_per_sm < TARGET_FORWARD_CTAS:
            failures.append(f"{where}: {r.registers} registers allow {r.ctas_per_sm} CTAs per SM, target "
                            f"{TARGET_FORWARD_CTAS}")
    return failures


def table(rows: list[Row]) -> str:
    head = ("| kernel | divergence | dtype | V | BLOCK_V | warps | arch | instr/elem | BAR | SHFL | regs | CTAs/SM "
            "| smem B | spill B | 16B loads |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        name = f"{r.divergence} ({r.variant})" if r.variant else r.divergence
        per_element = " / ".join(f"{loop.per_element:g}" for loop in r.loops) or "-"
        lines.append(f"| {r.kernel} | {name} | {r.dtype} | {r.vocabs} | {r.block_v} | {r.num_warps} | sm_{r.arch} | "
                     f"{per_element} | {sum(x.bar for x in r.loops)} | {sum(x.shfl for x in r.loops)} | "
                     f"{r.registers} | {r.ctas_per_sm} | {r.shared_bytes} | {r.spills} | "
                     f"{'yes' if r.loads_16b else 'no'} |")
    return "\n".join(lines)


def write_sass(rows: list[Row], directory: Path) -> None:
    """Each specialization's SASS, one file per representative V, and report.json beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for r in rows:
        for vocab in map(int, r.vocabs.split()):
            (directory / f"{r.kernel}-{r.name}-{r.dtype}-V{vocab}-sm_{r.arch}.sass").write_text(r.sass)
            entries.append(dict(kernel=r.kernel, divergence=r.name, dtype=r.dtype, V=vocab, arch=r.arch,
                                BLOCK_V=r.block_v, num_warps=r.num_warps, registers=r.registers,
                                spill_bytes=r.spills, ctas_per_sm=r.ctas_per_sm,
                                instructions_per_element=[loop.per_element for loop in r.loops],
                                loads_16b=r.loads_16b))
    (directory / "report.json").write_text(json.dumps(entries, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wpkl.kernels.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    parser.add_argument("--quick", action="store_true", help="only V >= 32000, and bf16 at V = 97")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--sass-dir", type=Path, help="write each specialization's SASS and report.json here")
    parser.add_argument("--workers", type=int, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    # Triton 3.9 warns when this is unset; 1 is its current default (FMA contraction on), stated explicitly.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    from wpkl.kernels import token_divergence_fwd_kernel

    if type(token_divergence_fwd_kernel).__name__ == "InterpretedFunction":
        # Compiling needs the real JIT functions: start over without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "wpkl.kernels.report", *(argv or sys.argv[1:])], env=env)

    import triton

    rows = run(args.arch, args.quick, args.workers)
    print(table(rows))
    failures = gate_failures(rows)
    print(f"\nTriton {triton.__version__}: {len(rows)} specializations compiled; {sum(bool(r.spills) for r in rows)} "
          f"spill; {sum(r.loads_16b for r in rows)} use only 16-byte loads in their vocabulary loops.")
    print("All gates pass." if not failures else "Gates failed:\n  " + "\n  ".join(failures))
    if args.json:
        args.json.write_text(json.dumps([r.record() for r in rows], indent=1))
    if args.sass_dir:
        write_sass(rows, args.sass_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
