"""Kernel resource report: compile every specialization wpkl launches, ahead of time, for sm_80 and sm_90.

    python -m wpkl.tools.kernel_report [--arch 80 90] [--json PATH] [--sass-dir DIR] [--quick]

Runs on a CPU-only machine: Triton builds PTX and cubin without a GPU, and ``cuobjdump`` (shipped in the
triton wheel) reads registers, shared memory and spill bytes (LOCAL, STACK) off the cubin and disassembles it.
The specializations come from the same launch builders the package uses (wpkl/backends: triton_pass.py, triton_topk.py, triton_mixture.py, weights_kernel.py), fed
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
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .sass import Loop, cuobjdump, ctas_per_sm, resources, vocabulary_loops
from .specializations import ARCHS, Job, jobs, launch, specialize


# Targets (docs/design.md), gated for bf16 on sm_90 at V = 128256, the specialization they name.
TARGET_VOCAB = 128256
TARGET_INSTRUCTIONS = {  # (kernel, divergence, loop index) -> max SASS instructions per element
    ("fwd", "reverse_kl", 0): 32,
    ("fwd", "forward_kl", 0): 32,
    ("fwd", "jsd", 1): 40,  # jsd's second pass
    ("jsd_partials", "jsd", 0): 40,  # the same pass on a vocabulary slice
    ("bwd", "reverse_kl", 0): 24,
    ("bwd", "forward_kl", 0): 24,
    ("bwd", "jsd", 0): 40,
}
TARGET_FORWARD_CTAS = 3
# Several teachers' pass (kernels/token_mixture.py, token_mixture_bwd.py), per element of the student row in each
# vocabulary loop, (kernel, jsd, variant) -> its loops' limits: K = 4 under reverse or forward KL against 4 x 32
# and 4 x 24 for four single-teacher passes (its forward holds K + 1 vectors per thread); jsd's K = 2 (its largest
# group) against 2 x (20 + 32) and 2 x 22 for two single-teacher passes. With top-k teachers ("dense": their
# dense part added, wpkl/backends/triton_logits_topk.py) one more instruction; one logits teacher with them
# within the single-teacher pass's targets, where the separate passes add a top-k student pass and its backward.
TARGET_MIXTURE_INSTRUCTIONS = {
    ("mixture_fwd", False, "K=4"): (80,), ("mixture_bwd", False, "K=4"): (40,),
    ("mixture_bwd", False, "K=4 dense"): (41,), ("mixture_fwd", False, "K=1"): (32,),
    ("mixture_bwd", False, "K=1 dense"): (24,),
    ("mixture_fwd", True, "K=2"): (40, 64), ("mixture_bwd", True, "K=2"): (44,), ("mixture_bwd", True, "K=2 dense"): (45,),
    ("mixture_fwd", True, "K=1"): (32, 40), ("mixture_bwd", True, "K=1 dense"): (40,),
    # jsd teachers on vocabulary shards: the forward's second pass alone (wpkl/parallel/shard_mixture.py)
    ("mixture_jsd_partials", True, "K=2"): (64,), ("mixture_jsd_partials", True, "K=1"): (40,)}
TARGET_MIXTURE_CTAS = 2
LOADS_16B_VOCABS = (32000, 128256, 151665, 151936, 262144)


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


def compile_job(job: Job) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, meta = launch(job)
    signature, constexprs, attrs, num_warps = specialize(fn, args, meta)
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options={"num_warps": num_warps})
    cubin = compiled.asm["cubin"]
    usage = resources(cubin)
    sass = cuobjdump(cubin, "-sass")
    registers, shared = usage.get("REG", -1), usage.get("SHARED", -1)
    block_v = next((constexprs[k] for k in ("BLOCK_V", "BLOCK", "BLOCK_K", "BLOCK_A") if k in constexprs), None)
    return Row(
        kernel=job.kernel, divergence=job.divergence, variant=job.variant, dtype=job.dtype, block_v=block_v,
        num_warps=num_warps, arch=job.arch, vocabs=" ".join(map(str, job.vocabs)), registers=registers,
        shared_bytes=shared, local_bytes=usage.get("LOCAL", -1), stack_bytes=usage.get("STACK", -1),
        ctas_per_sm=ctas_per_sm(registers, num_warps, shared, job.arch),
        loops=[] if job.kernel in ("weights", "topk", "mixture_atoms") else
        vocabulary_loops(sass, max(1, block_v // (32 * num_warps))),
        sass=sass,
    )


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
        if r.kernel in ("weights", "topk", "mixture_atoms"):  # [N] or [N, K] vectors, no vocabulary loop: no spills
            # is the gate
            continue
        vocabs = {int(v) for v in r.vocabs.split()}
        if not r.loops and min(vocabs) >= r.block_v:  # (V = 1 is a constant: its compiled loop runs 0 times)
            failures.append(f"{where}: no vocabulary loop found in the SASS")
        for i, loop in enumerate(r.loops):
            if loop.bar or loop.shfl:
                failures.append(f"{where}: loop {i} has {loop.bar} BAR and {loop.shfl} SHFL")
        if vocabs & set(LOADS_16B_VOCABS) and not (r.loads_16b and r.stores_16b):
            failures.append(f"{where}: vocabulary loop loads or stores are not all 16 bytes wide")
        if (r.dtype, r.arch) != ("bfloat16", 90) or TARGET_VOCAB not in vocabs:
            continue
        if r.kernel.startswith("mixture"):
            limits = TARGET_MIXTURE_INSTRUCTIONS.get((r.kernel, r.divergence == "jsd", r.variant))
            if limits is None:
                continue
            if len(r.loops) != len(limits):
                failures.append(f"{where}: {len(r.loops)} vocabulary loops, expected {len(limits)}")
            for i, (loop, limit) in enumerate(zip(r.loops, limits, strict=False)):
                if loop.per_element > limit:
                    failures.append(f"{where}: loop {i} takes {loop.per_element} instructions per element, "
                                    f"target {limit}")
            if r.kernel in ("mixture_fwd", "mixture_jsd_partials") and r.ctas_per_sm < TARGET_MIXTURE_CTAS:
                failures.append(f"{where}: {r.registers} registers allow {r.ctas_per_sm} CTAs per SM, target "
                                f"{TARGET_MIXTURE_CTAS}")
            continue
        if r.variant:
            continue
        for (kernel, divergence, index), limit in TARGET_INSTRUCTIONS.items():
            if (kernel, divergence) == (r.kernel, r.divergence):
                if index >= len(r.loops):
                    failures.append(f"{where}: vocabulary loop {index} not found")
                elif r.loops[index].per_element > limit:
                    failures.append(f"{where}: loop {index} takes {r.loops[index].per_element} instructions per "
                                    f"element, target {limit}")
        if r.kernel in ("fwd", "jsd_partials") and r.divergence in ("reverse_kl", "forward_kl", "jsd") and \
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
    parser = argparse.ArgumentParser(prog="python -m wpkl.tools.kernel_report", description=__doc__.split("\n\n")[0])
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
        return subprocess.call([sys.executable, "-m", "wpkl.tools.kernel_report", *(argv or sys.argv[1:])], env=env)

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
