"""The ``wpkl`` command line (main.py); one file per command."""

from .main import main

__all__ = ["main"]
