"""What every ``wpkl`` command shares: a user error (one line on stderr, exit code 2, never a traceback) and the
help formatter that shows defaults."""

from __future__ import annotations

import argparse


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in --help; options whose default is None or False (a flag) say nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"
