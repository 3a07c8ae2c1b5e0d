"""Config and path errors of ``mtpsl train`` come before torch is imported (issue 30, item 5).

``mtpsl.core.names`` reads the registered names from the plugins' source; the CLI checks a
config with it (:func:`~mtpsl.core.names.preflight`) before importing the engine. These tests
run the CLI in a fresh process and ask it whether torch was imported when the error came, and
compare each message with the one the full check (after the import) gives.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mtpsl.core.config import load_config
from mtpsl.core.errors import ConfigError, DataError
from mtpsl.core.names import NameIndex, plugin_files, preflight, registered, scan

PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from mtpsl.cli.app import main
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        out.append([code, err.getvalue(), "torch" in sys.modules])
    print(json.dumps(out))
""")
"""Runs ``main`` on each argv in one fresh process; reports the exit status, stderr and
whether torch had been imported by then (each case fails before it may import it)."""


def _cli_errors(cases: list[list[str]]) -> list[tuple[int, str, bool]]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [tuple(case) for case in json.loads(done.stdout)]


FULL_CHECK = textwrap.dedent("""
    import json, sys
    from mtpsl.core.config import load_config
    from mtpsl.core.errors import MtpslError
    from mtpsl.engine.build import check_names, make_or_load_split, open_dataset
    from mtpsl.models.encoders import EncoderSpec
    from mtpsl.models.encoders.base import build_encoder
    out = []
    for overrides in json.loads(sys.argv[1]):
        config = load_config("synthetic_demo", overrides)
        try:
            check_names(config)
            dataset = open_dataset(config, config.dataset.train_split)
            make_or_load_split(config, len(dataset), tuple(dataset.tasks))
            build_encoder(EncoderSpec(**config.model.backbone.model_dump()))
        except MtpslError as err:
            out.append(str(err))
        else:
            out.append(None)
    print(json.dumps(out))
""")
"""The messages of the check that runs after the import (names, then the datasets, the split
file, the encoder), in a fresh process (where nothing is registered at run time, as in the
CLI's), or None where it passes."""


def _full_check_errors(overrides: list[list[str]]) -> list[str | None]:
    done = subprocess.run([sys.executable, "-c", FULL_CHECK, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_train_reports_names_and_paths_before_importing_torch(tiny_root, tmp_path):
    base = ["train", "--config", "synthetic_demo", f"dataset.root={tiny_root}",
            f"output_dir={tmp_path}"]
    cases = {
        "dataset.root=/nonexistent/data": DataError,
        "model.name=nosuch": ConfigError,
        "method.name=nosuch": ConfigError,
        "method.weighting=nosuch": ConfigError,
        "dataset.name=nosuch": ConfigError,
        "labels.regime=nosuch": ConfigError,
        "labels.file=/nonexistent/split.json": DataError,
        "model.name=resnet model.backbone.name=nosuch": ConfigError,
        "dataset.options={extra_tasks: {edges: {type: nosuch}}}": ConfigError,
    }
    argvs = [[*base, *key.split(" ")] if "{" not in key else [*base, key] for key in cases]
    argvs += [[*base, "train.bogus=1"], [*base, "model.name=resnet",
                                         "model.backbone.weights=/nonexistent/w.pt"]]
    results = _cli_errors(argvs)
    for (code, err, torch_loaded), argv in zip(results, argvs, strict=True):
        assert code == 2 and err.startswith("error: "), (argv, err)
        assert not torch_loaded, f"torch was imported before the error of {argv[5:]}"
    full = _full_check_errors([[f"dataset.root={tiny_root}",
                                *([key] if "{" in key else key.split(" "))] for key in cases])
    for (_, err, _), key, expected in zip(results, cases, full, strict=False):
        assert expected is not None and err.strip() == f"error: {expected}", key
    assert "train.bogus: unknown key; allowed: epochs" in results[-2][1]
    assert results[-1][1].startswith("error: model.backbone.weights: /nonexistent/w.pt does "
                                     "not exist (weights are never downloaded")


def test_unknown_names_list_the_registered_ones(tiny_root):
    from mtpsl.models import MODELS
    from mtpsl.weighting import WEIGHTINGS

    for key, registry in (("model.name", MODELS), ("method.weighting", WEIGHTINGS)):
        config = load_config(None, [f"dataset.root={tiny_root}", f"{key}=nosuch"])
        with pytest.raises(ConfigError) as caught:
            preflight(config)
        listed = str(caught.value).split("; known: ")[1].split(", ")
        assert listed == registry.names() and len(listed) > 4


def _shipped(registry) -> list[str]:
    """The registry's names defined in mtpsl's own modules (not those other tests of this
    worker registered at run time)."""
    return [n for n in registry.names()
            if getattr(registry.get(n), "__module__", "").startswith("mtpsl.")]


def test_the_index_of_the_source_equals_the_imported_registries():
    from mtpsl.data import DATASETS
    from mtpsl.data.splits import REGIMES
    from mtpsl.engine.build import takes_backbone
    from mtpsl.methods import METHODS
    from mtpsl.metrics import METRICS
    from mtpsl.models import MODELS
    from mtpsl.models.encoders import ENCODERS
    from mtpsl.tasks import TASKS
    from mtpsl.weighting import WEIGHTINGS

    index = registered()
    live = {"DATASETS": DATASETS, "REGIMES": REGIMES, "METHODS": METHODS, "METRICS": METRICS,
            "MODELS": MODELS, "ENCODERS": ENCODERS, "TASKS": TASKS, "WEIGHTINGS": WEIGHTINGS}
    assert set(index.kinds) == set(live)
    for variable, registry in live.items():
        assert sorted(index.entries[variable]) == _shipped(registry), variable
        assert index.kinds[variable] == registry.kind
    for name in _shipped(MODELS):  # what the backbone checks rely on
        params = index.check("MODELS", name, "model.name").params
        assert params is not None and ("backbone" in params) == takes_backbone(MODELS.get(name))
    for name in _shipped(DATASETS):
        params = index.check("DATASETS", name, "dataset.name").params
        assert params is not None
        assert ("extra_tasks" in params) == (
            "extra_tasks" in inspect.signature(DATASETS.get(name)).parameters)


def test_a_new_plugin_file_is_in_the_index(tmp_path):
    (tmp_path / "base.py").write_text('THINGS: Registry[type] = Registry("thing")\n')
    (tmp_path / "mine.py").write_text(textwrap.dedent('''\
        """A plugin whose docstring shows an example at column 0:
        @THINGS.register("from_the_docstring")
        """
        from base import THINGS


        @THINGS.register("first")
        class First:
            def __init__(self, size: int, *, backbone=None) -> None:
                pass


        @THINGS.register(name="second")
        def second(root, split, *, extra_tasks=None):
            return root


        @THINGS.register()
        def third():
            """Named by its own name."""


        def helper():
            @THINGS.register("nested")
            class Nested:
                pass
        '''))
    (tmp_path / "other.py").write_text("def unrelated():\n    return 1\n")
    index = scan(sorted(tmp_path.glob("*.py")))
    assert index.kinds == {"THINGS": "thing"}
    assert index.names("THINGS") == ["first", "nested", "second", "third"]
    assert index.entry("THINGS", "first").params == ("size", "backbone")
    assert index.entry("THINGS", "second").params == ("root", "split", "extra_tasks")
    assert index.entry("THINGS", "nested").params is None  # no __init__ of its own
    with pytest.raises(ConfigError, match=r"^x\.name: unknown thing 'fourth'; known: first, "):
        index.check("THINGS", "fourth", "x.name")


def test_every_plugin_module_is_scanned():
    files = plugin_files()
    names = {p.relative_to(Path(__file__).parents[1] / "src" / "mtpsl").as_posix()
             for p in files}
    assert {"methods/xtc.py", "weighting/pcgrad.py", "models/encoders/timm_encoder.py",
            "data/layout.py"} <= names


def test_a_valid_config_passes_and_a_cross_domain_root_is_its_sources(tiny_root):
    preflight(load_config("synthetic_demo", [f"dataset.root={tiny_root}"]))
    # cross_domain's root only prefixes its sources' folders: no root error for it
    preflight(load_config(None, ["dataset.name=cross_domain", "dataset.root=/nonexistent"]))
    with pytest.raises(DataError, match="dataset root /nonexistent does not exist"):
        preflight(load_config(None, ["dataset.root=/nonexistent"]))
    empty = NameIndex()
    with pytest.raises(ConfigError, match=r"^dataset\.name: unknown \w+ .nyuv2.; known: $"):
        preflight(load_config(None, [f"dataset.root={tiny_root}"]), empty)
