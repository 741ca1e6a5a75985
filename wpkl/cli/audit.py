"""``wpkl audit``: the position-bias tables of saved PositionBiasMonitors and, with --out, their plots."""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import CommandError

MONITOR_FILE = "position_bias.pt"


def _monitor_files(run: Path) -> list[Path]:
    if run.is_file():
        return [run]
    if run.is_dir():
        files = sorted(run.rglob(MONITOR_FILE))
        if not files:
            raise CommandError(f"no {MONITOR_FILE} under {run} (save one with PositionBiasMonitor.save)")
        return files
    raise CommandError(f"{run} does not exist")


def audit(args) -> int:
    from ..audit import PositionBiasMonitor, plot

    files = _monitor_files(Path(args.run))
    monitors = []
    for path in files:
        try:
            monitors.append(PositionBiasMonitor.load(path))
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise CommandError(f"{path} is not a saved PositionBiasMonitor (PositionBiasMonitor.save writes one): "
                               f"{type(error).__name__}") from None
    try:
        import matplotlib  # noqa: F401

        can_plot = True
    except ImportError:
        can_plot = False
        print("matplotlib is not installed: printing tables only (pip install 'wpkl[plot]' for the plots)",
              file=sys.stderr)
    root = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    for path, monitor in zip(files, monitors, strict=True):
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


def add_parser(commands, formatter_class) -> None:
    parser = commands.add_parser("audit", help="print a position-bias table and write its plots",
                                 description="Print the position-bias table of saved PositionBiasMonitors and, with "
                                             "--out, write their plots.",
                                 formatter_class=formatter_class)
    parser.add_argument("run", help=f"a saved PositionBiasMonitor ({MONITOR_FILE}) or a folder holding some")
    parser.add_argument("--out", help="folder for the PNG plots (none written without it)")
    parser.set_defaults(handler=audit)
