"""The docs site builds with ``mkdocs build --strict`` (no broken link, anchor or reference),
and the reference pages that ``docs/hooks.py`` generates at build time hold what the code
defines: every sub-command, every config key, every registered name, every module.

The build takes 5-15 s, and under pytest-xdist every worker that runs one of its tests would
build the site again: those tests are in the slow tier, run a file at a time (CI runs it)."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def page(site: Path, name: str) -> str:
    """The text of a built page's article, tags removed."""
    text = (site / name / "index.html").read_text()
    article = text[text.index("<article"):text.index("</article>")]
    return html.unescape(re.sub(r"<[^>]+>", "", article))


@pytest.mark.slow
def test_the_registries_page_lists_every_registered_name(site):
    # the names a fresh process registers: test modules register plugins of their own in this
    # one (e.g. test_accumulate's test_no_norm model), which the site rightly does not list
    listed = subprocess.run(
        [sys.executable, "-c", "from mtpsl.cli.commands.listing import KINDS, entries\n"
         "for kind in KINDS:\n    for name, _ in entries(kind):\n        print(kind, name)"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    text = (site / "reference" / "registries" / "index.html").read_text()
    assert len(listed) > 50
    for kind, name in (line.split() for line in listed if line):
        assert f"<code>{name}</code>" in text, (kind, name)
    shown = page(site, "reference/registries")
    assert "MTPSL (Li, Liu & Bilen, CVPR 2022)" in shown
    assert "…" not in shown  # the descriptions whole, not cut as on a terminal


@pytest.mark.slow
def test_the_cli_page_shows_every_sub_command_help(site):
    from mtpsl.cli import build_parser
    from test_discoverability import _parsers

    text = page(site, "reference/cli")
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 15
    for parser in parsers:
        assert f"usage: {parser.prog}" in text, parser.prog
    assert "--launcher" in text and "--edge-measure" in text


@pytest.mark.slow
def test_the_config_page_has_every_key_and_every_option(site):
    from pydantic import BaseModel

    from mtpsl.core.config import Config
    from mtpsl.methods import METHODS
    from mtpsl.weighting import WEIGHTINGS

    def keys(section, prefix=""):
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    text = page(site, "reference/config")
    assert "train.amp" in text and "one of auto, off, bf16, fp16" in text
    for key in keys(Config()):
        assert key in text, key
    for registry in (METHODS, WEIGHTINGS):
        for name in registry.names():
            for option in registry.get(name).Options.model_fields:
                assert option in text, (name, option)
    assert "con_weight" in text and "float ≥ 0.0" in text


@pytest.mark.slow
def test_the_api_page_is_rendered_from_the_docstrings(site):
    text = page(site, "reference/api")
    for signature in ("load_config(", "train(", "resume(", "compare(", "load_run(",
                      "predict_many("):
        assert signature in text, signature
    assert "Train a new run" in text  # mtpsl.engine.run.train's docstring


@pytest.mark.slow
def test_the_layout_page_lists_every_module(site):
    text = page(site, "reference/layout")
    for path in (ROOT / "src" / "mtpsl").rglob("*.py"):
        if path.name != "__init__.py":
            assert path.name in text, path


@pytest.mark.slow
def test_the_demo_table_and_weighting_tables_reach_the_site(site):
    readme = (ROOT / "README.md").read_text()
    first_row = next(line for line in readme.splitlines() if line.startswith("| stl | "))
    assert first_row.split(" | ")[2] in page(site, "getting-started")
    assert "pcgrad@gramian" in page(site, "concepts/weightings")


def test_the_docs_python_example_is_the_tested_one():
    """Getting started shows the README's example, which tests/test_api.py runs."""
    from test_api import readme_example

    docs = (ROOT / "docs" / "getting-started.md").read_text()
    section = docs[docs.index("## Python API"):]
    assert re.search(r"```python\n(.*?)```", section, re.S).group(1) == readme_example()
