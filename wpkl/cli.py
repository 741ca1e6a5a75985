"""The ``wpkl`` command: ``wpkl audit`` (position-bias tables and plots) and ``wpkl demo`` (the OPD experiment)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MONITOR_FILE = "position_bias.pt"


def _monitor_files(run: Path) -> list[Path]:
    if run.is_file():
        return [run]
    if run.is_dir():
        return sorted(run.rglob(MONITOR_FILE))
    raise SystemExit(f"wpkl audit: {run} does not exist")


def audit(args) -> int:
    from .audit import PositionBiasMonitor, plot

    files = _monitor_files(Path(args.run))
    if not files:
        raise SystemExit(f"wpkl audit: no {MONITOR_FILE} under {args.run} (save one with PositionBiasMonitor.save)")
    try:
        import matplotlib  # noqa: F401

        can_plot = True
    except ImportError:
        can_plot = False
        print("matplotlib is not installed: printing tables only (pip install 'wpkl[plot]' for the plots)",
              file=sys.stderr)
    root = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    for path in files:
        monitor = PositionBiasMonitor.load(path)
        if path.parent != root:
            name = str(path.parent.relative_to(root))
        else:  # a single file: name it after its folders (e.g. runs/uniform/seed0 -> uniform/seed0)
            name = path.stem if path.stem != MONITOR_FILE.removesuffix(".pt") else "/".join(path.parent.parts[-2:])
        print(f"\n== {path}\n{monitor.format_table()}")
        if can_plot and args.out:
            target = Path(args.out) / name if len(files) > 1 else Path(args.out)
            for png in plot(monitor, target, title=name):
                print(f"wrote {png}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="wpkl", description="wpkl: weighted token-level KL for on-policy distillation")
    commands = parser.add_subparsers(dest="command", required=True)

    audit_parser = commands.add_parser("audit", help="print a position-bias table and write its plots")
    audit_parser.add_argument("run", help=f"a saved PositionBiasMonitor ({MONITOR_FILE}) or a folder holding some")
    audit_parser.add_argument("--out", help="folder for the PNG plots (none written without it)")
    audit_parser.set_defaults(handler=audit)

    from .demo.cli import add_parser as add_demo_parser

    add_demo_parser(commands)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
