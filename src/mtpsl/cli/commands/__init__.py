"""Sub-commands that live in their own modules.

Every module in this package defines ``add_parser(subparsers)``, which adds one sub-command
and sets its ``func``; ``mtpsl.cli.app`` discovers them, so adding a command is adding a file here.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil


def add_all(subparsers: argparse._SubParsersAction) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").add_parser(subparsers)
