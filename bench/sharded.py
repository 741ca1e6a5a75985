"""The vocabulary-parallel loss (``process_group=``) against one device, at the same total vocabulary V.

    python -m torch.distributed.run --standalone --nproc_per_node R bench/sharded.py \\
        [--device cuda|cpu] [--shapes NxV:dtype ...] [--cases uniform combined] [--out DIR] [--budget S]

For each shape and case (bench/cases.py: ``uniform`` and ``combined``), forward + backward of
``wpkl.weighted_kl_loss`` on materialized logits (the Triton backend on CUDA, the torch backend on the CPU):

- single device: rank 0 alone, the whole [N, V] student and teacher, no process group (the other ranks wait
  at a barrier, so nothing else runs on a shared GPU meanwhile);
- sharded: every rank its [N, V / R] slice of the same logits, ``process_group`` = the R ranks.

Timing: warm-up calls (Triton's compilation) excluded, then repeated calls, each after a barrier (and, on CUDA,
an L2 flush and ``torch.cuda.synchronize``) timed with CUDA events (``time.perf_counter`` on the CPU); a
sharded call's time is the slowest rank's median (the step waits for it). Peak memory per rank: the
``torch.cuda.max_memory_allocated`` delta over one call (CPU: bench/measure.py's resident-set delta). The
sharded loss is compared with the single-device one (same inputs) as a check.

Placement: with a GPU per rank, rank r uses cuda:r (NCCL if available). With fewer GPUs than ranks the ranks
share them (rank r on cuda:(r mod #GPUs)) and talk through gloo (NCCL refuses two ranks on one GPU): the sharded
time then includes R processes contending for one device and gloo's host round trips, and is labelled
"R ranks on 1 GPU". Writes ``sharded-<device>-<date>.json`` and ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script (torchrun bench/sharded.py): this checkout's bench and wpkl
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.sharded_report import Row, markdown, write  # noqa: E402

DEFAULT_SHAPES = {"cuda": ["4096x128256", "4096x262144", "16384x128256"], "cpu": ["256x8192:float32"]}
CASE_NAMES = ("uniform", "combined")
L2_FLUSH_BYTES = 256 << 20


def parse_args(argv, script: str = "bench/sharded.py", description: str = __doc__, cases=CASE_NAMES):
    parser = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node R {script}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--shapes", nargs="+", metavar="NxV[:dtype]",
                        help="total vocabulary V (a multiple of R), e.g. 4096x128256 (default dtype bfloat16)")
    parser.add_argument("--cases", nargs="+", choices=cases, default=list(cases))
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                        help="the process group's; auto: NCCL with a GPU per rank, else gloo")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--budget", type=float, default=None, help="start no measurement after this many seconds")
    parser.add_argument("--rep-seconds", type=float, default=None,
                        help="time spent in timed calls per measurement (default 1 on CUDA, 0.3 on the CPU)")
    return parser.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        self.cuda = device == "cuda"
        gpus = torch.cuda.device_count() if self.cuda else 0
        own_gpu = self.cuda and gpus >= local_world
        backend = args.backend
        if backend == "auto":
            backend = "nccl" if own_gpu and dist.is_nccl_available() else "gloo"
        if self.cuda:
            self.device = torch.device("cuda", local_rank % gpus)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300),
                                **({"device_id": self.device} if backend == "nccl" else {}))
        self.group = dist.group.WORLD
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = backend
        nodes = self.world // local_world
        if self.cuda:
            per_node = min(gpus, local_world)
            self.layout = (f"{self.world} ranks on {per_node * nodes} GPU{'s' if per_node * nodes > 1 else ''}"
                           + ("" if own_gpu else " (shared)"))
        else:
            self.layout = f"{self.world} ranks on the CPU"
        self.shared = self.cuda and not own_gpu
        self.wpkl_backend = "triton" if self.cuda else "torch"
        self.rep_seconds = args.rep_seconds or (1.0 if self.cuda else 0.3)
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=self.device) if self.cuda else None

    # --------------------------------------------------------------------------------------- helpers

    def barrier(self):
        dist.barrier(group=self.group)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def budget_spent(self) -> bool:
        """Rank 0 decides for every rank (they must run the same collectives)."""
        spent = torch.tensor([0], dtype=torch.int64)
        if self.rank == 0 and self.args.budget is not None:
            spent[0] = int(time.monotonic() - self.start > self.args.budget)
        if self.backend == "nccl":
            spent = spent.to(self.device)
        dist.broadcast(spent, 0, group=self.group)
        return bool(spent.item())

    def gather(self, value):
        out = [None] * self.world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def agree_reps(self, reps: int, collective: bool) -> int:
        if not collective:
            return reps
        return min(self.gather(reps))

    def time_calls(self, fn, grads, collective: bool) -> list[float]:
        """Warm-up, then ``reps`` timed calls (ms), each after a barrier (collective) and an L2 flush."""
        def call():
            for t in grads:
                t.grad = None
            fn()

        for _ in range(3):  # compilation, autotuning, allocator warm-up
            call()
        self.sync()
        t0 = time.perf_counter()
        call()
        self.sync()
        once = time.perf_counter() - t0
        reps = self.agree_reps(max(5, min(100, int(self.rep_seconds / max(once, 1e-6)))), collective)
        times = []
        for _ in range(reps):
            for t in grads:
                t.grad = None
            if self.flush is not None:
                self.flush.zero_()
            self.sync()
            if collective:
                self.barrier()
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        for t in grads:
            t.grad = None
        return times

    def peak_mib(self, fn, grads) -> float | None:
        from bench.measure import peak_extra_bytes

        peak = peak_extra_bytes(fn, "cuda" if self.cuda else "cpu")
        for t in grads:
            t.grad = None
        return None if peak is None else peak / 2**20

    # ----------------------------------------------------------------------------------------- inputs

    def slice_inputs(self, shape, part: int, seed: int = 0):
        """Slice ``part`` of the R equal vocabulary slices of the case's logits, generated slice by slice (so
        rank 0 builds the full logits as the concatenation of the very slices the ranks hold)."""
        B, T = shape.batch
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed * 1000 + part)
        v = shape.vocab // self.world
        student = torch.randn(B, T, v, generator=gen, device=self.device, dtype=dtype).mul_(2)
        teacher = torch.randn(B, T, v, generator=gen, device=self.device, dtype=dtype).mul_(2)
        return student, teacher

    def loss_fn(self, case, student, teacher, mask, group):
        import wpkl

        def fn():
            loss = wpkl.weighted_kl_loss(student, teacher, mask=mask, weighting=case.weighting,
                                         divergence=case.divergence, backend=self.wpkl_backend, process_group=group)
            loss.backward()
            return loss

        return fn

    # ------------------------------------------------------------------------------------ measurement

    def measure(self, case, shape, student, teacher, mask, sharded: bool) -> Row:
        layout = self.layout if sharded else "1 device"
        row = Row(case.name, shape.tokens, shape.vocab, shape.dtype, layout, self.world if sharded else 1, "ok")
        fn = self.loss_fn(case, student, teacher, mask, self.group if sharded else None)
        try:
            student.requires_grad_(True)
            row.loss = float(fn().detach())
            student.grad = None
            times = self.time_calls(fn, [student], collective=sharded)
            peak = self.peak_mib(fn, [student])
            error = None
        except Exception as e:  # noqa: BLE001 - a failure is a result (single device: rank 0 alone)
            times, peak, error = [], None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        finally:
            student.grad = None
            student.requires_grad_(False)
        results = self.gather((times, peak, error, row.loss)) if sharded else [(times, peak, error, row.loss)]
        errors = [f"rank {r}: {e}" for r, (_, _, e, _) in enumerate(results) if e]
        if errors:
            row.status, row.note, row.loss = "error", "; ".join(errors), None
            return row
        medians = [statistics.median(t) for t, *_ in results]
        slowest = max(range(len(results)), key=lambda r: medians[r])
        quantiles = sorted(results[slowest][0])
        pick = lambda q: quantiles[min(len(quantiles) - 1, int(q * len(quantiles)))]  # noqa: E731
        row.ms, row.ms_p20, row.ms_p80 = medians[slowest], pick(0.2), pick(0.8)
        row.ms_per_rank = medians
        row.peak_extra_mib_per_rank = [p for _, p, _, _ in results]
        return row

    def run(self, shapes, cases) -> list[Row]:
        from bench.cases import CASES

        rows = []
        for shape in shapes:
            if shape.vocab % self.world:
                rows += [Row(c, shape.tokens, shape.vocab, shape.dtype, layout, ranks, "skipped",
                             note=f"V is not a multiple of {self.world} ranks")
                         for c in cases for layout, ranks in (("1 device", 1), (self.layout, self.world))]
                continue
            B, T = shape.batch
            mask = torch.ones(B, T, dtype=torch.bool, device=self.device)
            # Single device: rank 0 alone on the whole vocabulary, the others waiting.
            single = {}
            for name in cases:
                if self.budget_spent():
                    single[name] = Row(name, shape.tokens, shape.vocab, shape.dtype, "1 device", 1, "skipped",
                                       note=f"time budget of {self.args.budget:.0f} s spent")
                    continue
                if self.rank == 0:
                    parts = [self.slice_inputs(shape, r) for r in range(self.world)]
                    student = torch.cat([s for s, _ in parts], dim=-1)
                    teacher = torch.cat([t for _, t in parts], dim=-1)
                    del parts
                    single[name] = self.measure(CASES[name], shape, student, teacher, mask, sharded=False)
                    del student, teacher
                    if self.cuda:
                        torch.cuda.empty_cache()
                self.barrier()
            # Sharded: every rank its slice.
            student, teacher = self.slice_inputs(shape, self.rank)
            sharded = {}
            for name in cases:
                if self.budget_spent():
                    sharded[name] = Row(name, shape.tokens, shape.vocab, shape.dtype, self.layout, self.world,
                                        "skipped", note=f"time budget of {self.args.budget:.0f} s spent")
                    continue
                sharded[name] = self.measure(CASES[name], shape, student, teacher, mask, sharded=True)
            del student, teacher
            if self.cuda:
                torch.cuda.empty_cache()
            for name in cases:
                one, many = single.get(name), sharded[name]
                if one is not None and one.loss is not None and many.loss is not None:
                    tol = 1e-4 if shape.dtype == "float32" else 2e-2
                    if abs(one.loss - many.loss) > tol * max(1.0, abs(one.loss)):
                        many.status = "mismatch"
                    many.note = (f"{many.note}; " if many.note else "") + (
                        f"loss {many.loss:.6g} (single device {one.loss:.6g})")
                if self.rank == 0:
                    rows += [one, many]
            self.barrier()
        return rows

    def meta(self, shapes) -> dict:
        import importlib.metadata

        from bench.measure import device_name

        versions = {}
        for package in ("torch", "triton", "wpkl"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                pass
        name = torch.cuda.get_device_name(self.device) if self.cuda else device_name("cpu")
        notice = ""
        if self.shared:
            notice = (f"{self.layout}: all {self.world} ranks share one device, so the sharded times include them "
                      "contending for it (and gloo's host round trips); they are not a multi-GPU speedup.")
        elif not self.cuda:
            notice = ("CPU run (the torch backend, gloo): a rehearsal of the benchmark, not a measurement of the "
                      "Triton kernels.")
        return dict(device=name, device_kind="cuda" if self.cuda else "cpu", ranks=self.world, layout=self.layout,
                    process_group_backend=self.backend, wpkl_backend=self.wpkl_backend,
                    date=datetime.date.today().isoformat(), command="torchrun --nproc_per_node "
                    f"{self.world} bench/sharded.py " + " ".join(sys.argv[1:]), versions=versions,
                    shapes=[s.label for s in shapes], mode="fwd+bwd",
                    timer="CUDA events, barrier + L2 flush + synchronize before each call" if self.cuda else
                    "time.perf_counter, barrier before each call",
                    memory_method="torch.cuda.max_memory_allocated delta per rank" if self.cuda else
                    "peak RSS delta per rank (bench/measure.py)", notice=notice)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.cases import parse_shape

    bench = Bench(args)
    shapes = [parse_shape(s) for s in (args.shapes or DEFAULT_SHAPES["cuda" if bench.cuda else "cpu"])]
    if bench.rank == 0 and bench.meta(shapes)["notice"]:
        print(bench.meta(shapes)["notice"], file=sys.stderr, flush=True)
    try:
        rows = bench.run(shapes, args.cases)
        failed = torch.tensor([0], dtype=torch.int64)
        if bench.rank == 0:
            meta = bench.meta(shapes)
            write(args.out, "sharded", meta, rows, markdown(meta, rows))
            failed[0] = int(any(r.status in ("error", "mismatch") for r in rows))
        bench.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return int(failed[0])


if __name__ == "__main__":
    code = main()
    # As examples/tp_distill.py: gloo's worker threads may still hold the last collectives' tensors while the
    # interpreter shuts down, which aborts the process now and then; the results are written, so skip the teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
