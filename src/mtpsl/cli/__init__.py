"""The ``mtpsl`` command line (:mod:`mtpsl.cli.app`); its sub-commands live in
:mod:`mtpsl.cli.commands`, one module each."""

from mtpsl.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
