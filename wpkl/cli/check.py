"""``wpkl check``: wpkl's own routes (every backend the device runs, every divergence, a weighting of each kind,
top-k modes, fused-linear, torch.compile on CUDA) through the ``wpkl.testing`` harness, one row per route, after
the environment a bug report needs. Exit 1 on any failure."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .errors import CommandError

QUICK_CASES = ("random", "banned_token", "masking", "temperature")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def environment(device) -> dict:
    import torch

    from .. import __version__

    env = {"wpkl": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda (torch build)": torch.version.cuda, "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)

    return env


def run(args) -> int:
    import torch

    from ..engine.route import kernels_interpreted, triton_installed
    from ..testing import check_loss
    from ..testing.cases import select
    from ..testing.routes import routes

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda, but CUDA is not available here (use --device cpu)")
    if device.type == "cpu" and triton_installed() and os.environ.get("TRITON_INTERPRET") != "1":
        # The kernels run on CPU tensors only under the interpreter, which must be set before Triton is imported.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "wpkl.cli", "check", *sys.argv[2:]] if args.argv is None
                               else [sys.executable, "-m", "wpkl.cli", "check", *args.argv], env=env)
    backends = ("torch",)
    if triton_installed() and (device.type == "cuda" or kernels_interpreted()):
        backends = ("triton", "torch")
    dtypes = [getattr(torch, name) for name in (args.dtype or DTYPE_NAMES)]
    cases = QUICK_CASES if args.quick else None
    env = environment(device)
    print("\n".join(f"{key:20s} {value}" for key, value in env.items()), flush=True)
    header = f"{'route':42s} {'max value err':>13s} {'max grad err':>12s} {'err/limit':>9s} {'s':>7s}  result"
    print("\n" + header, flush=True)
    results, failed = [], 0
    for route in routes(backends, device.type == "cuda"):
        chosen = [c.name for c in select(cases, device.type == "cuda", args.quick) if c.name not in route.skips]
        start = time.perf_counter()
        report = check_loss(route.fn, divergence=route.divergence, reference=route.reference, dtypes=dtypes,
                            device=device, cases=chosen, quick=args.quick)
        seconds = time.perf_counter() - start
        def worst(attr, results=report.results):
            return max((getattr(r, attr) for r in results if not r.skipped), default=0.0,
                       key=lambda x: -1.0 if x != x else x)

        row = dict(route=route.name, passed=report.passed, seconds=round(seconds, 3),
                   value_error=worst("value_error"), grad_error=worst("grad_error"),
                   worst_ratio=worst("ratio"),
                   failures=[f"{r.case} {r.dtype}: {r.message}" for r in report.failures])
        results.append(row)
        failed += not report.passed
        verdict = "pass" if report.passed else "FAIL: " + "; ".join(row["failures"][:3])
        print(f"{route.name:42s} {row['value_error']:13.2e} {row['grad_error']:12.2e} {row['worst_ratio']:9.2f} "
              f"{seconds:7.1f}  {verdict}", flush=True)
    print(f"\n{len(results) - failed} of {len(results)} routes passed" + (f"; {failed} FAILED" if failed else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


def add_parser(commands, formatter_class) -> None:
    parser = commands.add_parser("check", help="check wpkl's kernels and routes on this machine",
                                 description="Run every wpkl route this device supports through the wpkl.testing "
                                             "harness against the float64 reference, one row per route; exit 1 on "
                                             "any failure.", formatter_class=formatter_class)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--dtype", nargs="+", choices=DTYPE_NAMES, help="default: all three")
    parser.add_argument("--quick", action="store_true", help=f"only the cases {', '.join(QUICK_CASES)}")
    parser.add_argument("--json", help="also write the environment and results as JSON here")
    parser.set_defaults(handler=run, argv=None)
