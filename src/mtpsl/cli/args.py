"""Arguments several sub-commands share, defined once so they read and behave alike."""

from __future__ import annotations

import argparse

CARD_FALLBACK = ("a copy of the run's dataset layout: only checkpoints written before the "
                 "model card need it (--root is an alias)")
"""Help of ``--data`` where the data only stands in for an old checkpoint's task list."""


def add_data_option(parser: argparse.ArgumentParser, help: str = CARD_FALLBACK) -> None:
    """``--data DIR`` (alias ``--root``): a dataset folder of the run's layout."""
    parser.add_argument("--data", "--root", dest="root", metavar="DIR", help=help)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` and the ``key=value`` overrides of the commands that build a config."""
    parser.add_argument("--config", help="YAML file or preset name (see `mtpsl presets`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.epochs=5 model.width=0.25; every key "
                        "with its allowed values: `mtpsl config show [PRESET]`, names: "
                        "`mtpsl list`")
