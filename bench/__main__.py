"""python -m bench: time wpkl against eager torch, torch.compile, TRL and Liger on the same inputs."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from .cases import (CASES, DEFAULT_SHAPES, QUICK_SHAPES, SMOKE_SHAPE, case_teachers, make_inputs, minimal_bytes_for,
                    parse_shape)
from .measure import (
    CPU_MEMORY_METHOD,
    CUDA_MEMORY_METHOD,
    copy_bandwidth_gbps,
    device_name,
    peak_extra_bytes,
    slug,
    time_ms,
)
from .linear import LINEAR_CASES
from .linear import PROVIDERS as LINEAR_PROVIDERS
from .linear import SHAPES as LINEAR_SHAPES
from .linear import parse_linear_shape, rows_for
from .providers import PROVIDERS, build, unavailable
from .results import Results, Row

ROOT = Path(__file__).resolve().parent.parent
MODES = ("fwd", "fwd+bwd")


def _versions() -> dict[str, str]:
    out = {}
    for package in ("torch", "triton", "wpkl", "trl", "liger-kernel", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or "?"
    return out


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


def measure(provider, case, inputs, shape, mode, device, copy_gbps) -> Row:
    backward = mode == "fwd+bwd"
    student = inputs.student.requires_grad_(backward)
    fn = build(provider, case, inputs, backward)

    def step():
        if backward:
            fn().backward()
        else:
            with torch.no_grad():
                fn()

    row = Row(provider, case.name, shape.tokens, shape.vocab, shape.dtype, mode, "ok")
    try:
        with torch.no_grad():
            row.note = f"loss {float(fn()):.6g}"
        student.grad = None
        row.ms, row.ms_p20, row.ms_p80 = time_ms(step, device, grad_to_none=[student] if backward else None)
        student.grad = None
        peak = peak_extra_bytes(step, device)
        row.peak_extra_mib = None if peak is None else peak / 2**20
    except Exception as error:  # noqa: BLE001 - a provider failing is a result, not a crash of the sweep
        row.status = "oom" if _is_oom(error) else "error"
        row.note = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
    finally:
        student.grad = None
        inputs.student.requires_grad_(False)
        if device == "cuda":
            torch.cuda.empty_cache()
    if row.ms:
        row.gbps = minimal_bytes_for(case, shape, backward) / (row.ms * 1e-3) / 1e9
        row.copy_fraction = row.gbps / copy_gbps
    return row


def interpreter_smoke(case) -> Row:
    """CPU only: the Triton kernels under the interpreter, against the reference, loss and gradient."""
    import wpkl

    inputs = make_inputs(SMOKE_SHAPE, "cpu")
    out = {}
    for backend in ("triton", "reference"):
        leaf = inputs.student.detach().clone().requires_grad_(True)
        options = dict(mask=inputs.mask, weighting=case.weighting, divergence=case.divergence, backend=backend,
                       **({} if case.topk else dict(tokens=inputs.tokens)), **dict(case.options))
        teachers = case_teachers(case, inputs)
        if case.teachers > 1:
            loss = wpkl.multi_teacher_loss(leaf, teachers=teachers, **options)
        elif case.topk:
            loss = wpkl.weighted_kl_loss(leaf, None, **teachers[0], **options)
        else:
            loss = wpkl.weighted_kl_loss(leaf, teachers[0], **options)
        loss.backward()
        out[backend] = (loss.detach(), leaf.grad)
    ok = torch.allclose(*[v[0] for v in out.values()], rtol=1e-4, atol=1e-5) and torch.allclose(
        *[v[1] for v in out.values()], rtol=1e-3, atol=1e-6)
    return Row("wpkl", case.name, SMOKE_SHAPE.tokens, SMOKE_SHAPE.vocab, SMOKE_SHAPE.dtype, "fwd+bwd",
               "smoke-ok" if ok else "smoke-failed",
               note="Triton interpreter vs reference (correctness only, not timed)")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small set of shapes (a few minutes on a 2-core CPU)")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="NxV[:dtype]",
                        help="explicit shapes, e.g. 4096x128256 or 1024x32000:float32 (default dtype bfloat16)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--budget", type=float, default=None, help="stop measuring after this many seconds")
    parser.add_argument("--plot", type=Path, metavar="RESULTS.json", help="only plot a results file, then exit")
    parser.add_argument("--plot-dir", type=Path, default=ROOT / "docs" / "figures", help="where --plot writes PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--suite", choices=("all", "logits", "linear"), default="all",
                        help="logits: materialized [N, V] logits; linear: from hidden states and lm_head weights")
    parser.add_argument("--linear-shapes", nargs="+", type=parse_linear_shape, metavar="NxHxV[:dtype]",
                        help="fused-linear shapes, e.g. 4096x4096x128256 (default: the suite's, per device)")
    parser.add_argument("--linear-providers", nargs="+", choices=LINEAR_PROVIDERS, default=list(LINEAR_PROVIDERS))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:
        from .plot import plot

        for path in plot(args.plot, args.plot_dir):
            print(f"wrote {path}")
        return 0

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the trl provider imports trl.experimental
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    notice = ""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before wpkl.kernels is first imported
        notice = ("No CUDA GPU: these are CPU timings of the torch providers; the Triton kernels only ran the "
                  "interpreter's correctness smoke. GPU numbers need a GPU: run bench/gpu.sh there.")
        print(notice, file=sys.stderr)
    if args.shapes:
        shapes = args.shapes
    elif args.quick or device == "cpu":
        if device == "cpu" and not args.quick:
            print("The default shapes need a GPU; running the quick CPU set.", file=sys.stderr)
        shapes = QUICK_SHAPES[device]
    else:
        shapes = DEFAULT_SHAPES

    cases = [CASES[name] for name in args.cases] if args.suite != "linear" else []
    if args.suite == "linear":
        shapes = []
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    date = datetime.date.today().isoformat()
    copy_gbps = copy_bandwidth_gbps(device)
    results = Results(meta=dict(
        device=device_name(device), device_kind=device, date=date, command=command.strip(), versions=_versions(),
        timer="triton.testing.do_bench (L2 flushed per run)" if device == "cuda" else
        "torch.utils.benchmark.Timer.blocked_autorange",
        memory_method=CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD,
        copy_gbps=copy_gbps, notice=notice, cases={c.name: c.description for c in cases}, providers=args.providers,
    ))
    linear_shapes = [] if args.suite == "logits" else (args.linear_shapes or LINEAR_SHAPES[device])
    if linear_shapes:
        results.meta["cases"].update({f"linear-{name}": "from hidden states and lm_head weights: "
                                      + CASES[name].description for name in LINEAR_CASES})
        results.meta["linear_providers"] = args.linear_providers

    jobs = [(shape, case, provider, mode) for shape in shapes for case in cases for provider in args.providers
            for mode in args.modes]
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            progress = tqdm(total=len(jobs), desc="bench", unit="run", file=sys.stderr)
        except ImportError:
            pass
    start = time.monotonic()
    for shape in shapes:
        try:
            inputs = make_inputs(shape, device)
        except Exception as error:  # noqa: BLE001
            if not _is_oom(error):
                raise
            reason = f"the inputs alone do not fit in {device} memory"
            results.rows += [Row(p, c.name, shape.tokens, shape.vocab, shape.dtype, m, "skipped", note=reason)
                             for s, c, p, m in jobs if s == shape]
            if progress:
                progress.update(sum(1 for s, *_ in jobs if s == shape))
            continue
        for case in cases:
            for provider in args.providers:
                for mode in args.modes:
                    if progress:
                        progress.set_postfix_str(f"{shape.label} {case.name} {provider} {mode}")
                    reason = unavailable(provider, case, device)
                    if args.budget is not None and time.monotonic() - start > args.budget:
                        reason = f"time budget of {args.budget:.0f} s spent"
                    if reason:
                        row = Row(provider, case.name, shape.tokens, shape.vocab, shape.dtype, mode, "skipped",
                                  note=reason)
                    else:
                        row = measure(provider, case, inputs, shape, mode, device, copy_gbps)
                    results.rows.append(row)
                    if progress:
                        progress.update(1)
        del inputs
    def budget_left():
        if args.budget is not None and time.monotonic() - start > args.budget:
            return f"time budget of {args.budget:.0f} s spent"
        return None

    def measure_linear(fn, grads):
        ms, p20, p80 = time_ms(fn, device, grad_to_none=grads)
        for t in grads:
            t.grad = None
        return ms, p20, p80, peak_extra_bytes(fn, device)

    for shape in linear_shapes:
        if progress:
            progress.set_postfix_str(f"linear {shape.label}")
        results.rows += rows_for(shape, device, args.linear_providers, budget_left, measure_linear)
    if progress:
        progress.close()
    if device == "cpu" and "wpkl" in args.providers and cases:
        results.rows += [interpreter_smoke(case) for case in cases]

    target = args.out / f"{slug(results.meta['device'])}-{date}.json"
    results.save(target)
    print(results.markdown())
    print(f"\nwrote {target} and {target.with_suffix('.md')}")
    failed = [r for r in results.rows if r.status in ("error", "smoke-failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
