"""`mtpsl list` and `mtpsl config show`: what a config can name and what each key means, read
from the registries and the config schema (so a new entry shows up without editing them)."""

from __future__ import annotations

import argparse

import pytest
import yaml

from mtpsl.cli import main
from mtpsl.core.config import build_config, load_config, preset_names
from mtpsl.core.registry import Registry
from mtpsl.methods import METHODS
from mtpsl.weighting import WEIGHTINGS


def test_list_prints_every_registered_entry_with_a_description(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert sorted(lines) == METHODS.names()
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines.values())
    assert "MTPSL (Li, Liu & Bilen, CVPR 2022)" in lines["xtc"]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for heading in ("methods (method.name):", "models (model.name):",
                    "weightings (method.weighting):", "datasets (dataset.name):",
                    "tasks (", "regimes (labels.regime):", "presets (--config NAME):"):
        assert heading in out
    assert all(f"  {name} " in out for name in preset_names() + WEIGHTINGS.names())
    with pytest.raises(SystemExit):  # argparse names the allowed kinds
        main(["list", "nope"])
    assert "choose from 'methods'" in capsys.readouterr().err


def test_descriptions_come_from_docstrings():
    registry = Registry("thing")

    @registry.register("new")
    class New:
        """A new entry: ``literal`` and :class:`Role` markup
        collapse to one line.

        Second paragraph, not shown."""

    assert registry.describe("new") == "A new entry: literal and Role markup collapse to one line."
    assert registry.describe("new", width=12) == "A new entry…"


def test_config_show_is_the_resolved_config_as_commented_yaml(capsys):
    overrides = ["method.name=xtc", "train.epochs=3"]
    assert main(["config", "show", "synthetic_demo", *overrides]) == 0
    out = capsys.readouterr().out
    shown = build_config(yaml.safe_load(out), "shown")
    assert shown == load_config("synthetic_demo", overrides)
    line = next(x for x in out.splitlines() if x.startswith("  name: xtc"))
    assert "one of " + ", ".join(METHODS.names()) in line
    epochs = next(x for x in out.splitlines() if x.startswith("  epochs: 3"))
    assert "int > 0" in epochs and "Training epochs" in epochs
    amp = next(x for x in out.splitlines() if x.startswith("  amp:"))
    assert "one of auto, off, bf16, fp16" in amp
    # The chosen method's own options, with their bounds and meaning.
    con = next(x for x in out.splitlines() if "#   con_weight: 2.0" in x)
    assert "float ≥ 0.0" in con and "consistency" in con


def test_config_show_errors_are_one_line(capsys):
    assert main(["config", "show", "no_such_preset"]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    assert main(["config", "show", "synthetic_demo", "train.epochs=0"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_and_sub_command_prints_its_help():
    """``--help`` formats every help string (a stray "%" in one broke ``mtpsl figures``)."""
    from mtpsl.cli import build_parser

    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        assert parser.format_help().startswith("usage:")
