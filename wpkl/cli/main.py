"""The ``wpkl`` command: ``wpkl audit`` (position-bias tables and plots), ``wpkl check`` (wpkl's routes
against the float64 reference on this machine) and ``wpkl demo`` (the OPD experiment).

Bad arguments and unusable files end with one line on stderr (``wpkl <command>: error: ...``) and exit code 2,
never a traceback. Each command is one file here with an ``add_parser(commands, formatter_class)``.
"""

from __future__ import annotations

import argparse
import sys

from . import audit, check, demo
from .errors import CommandError, HelpFormatter

COMMANDS = (audit, check, demo)


def parser() -> argparse.ArgumentParser:
    from .. import __version__

    root = argparse.ArgumentParser(prog="wpkl", description="wpkl: weighted token-level KL for on-policy distillation",
                                   formatter_class=HelpFormatter)
    root.add_argument("--version", action="version", version=f"wpkl {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands, HelpFormatter)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "argv"):  # a command that re-runs itself (wpkl check under the Triton interpreter)
        args.argv = None if argv is None else list(argv)[1:]
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"wpkl {args.command}: error: {error}", file=sys.stderr)
        return 2
