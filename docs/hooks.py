"""MkDocs hook: the reference parts of the site, generated from the code at every build.

A page asks for a generated part with a marker line, replaced before the page is rendered:

- ``<!-- mtpsl:cli -->``: every command's and sub-command's ``--help``, walked from
  :func:`mtpsl.cli.build_parser`;
- ``<!-- mtpsl:config -->``: every config key with its default, allowed values and meaning, as
  ``mtpsl config show`` renders them (:mod:`mtpsl.cli.commands.config_show`), then the options
  of each method and weighting;
- ``<!-- mtpsl:registries -->``: every registry entry with the description ``mtpsl list`` prints
  (there cut at 100 characters, here whole);
- ``<!-- mtpsl:layout -->``: every module of the package with the first sentence of its
  docstring;
- ``<!-- mtpsl:demo-table -->``: the README's demo table (written there by
  ``benchmarks/readme_table.py`` from the committed record).

Nothing generated is written to disk. Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mtpsl"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("[", "\\[")


# --- the command line ---------------------------------------------------------------------

def _parsers(parser: argparse.ArgumentParser,
             path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str,
                                                           argparse.ArgumentParser]]:
    """(path, one-line help, parser) of ``parser`` and every sub-command below it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), helps.get(name, ""), sub
                yield from _parsers(sub, (*path, name))


def cli_reference() -> str:
    from mtpsl.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal's width: fix it
    try:
        root = build_parser()
        commands = list(_parsers(root))
        lines = ["| command | what it does |", "|---|---|"]
        lines += [f"| [`mtpsl {' '.join(path)}`](#{'-'.join(('mtpsl', *path))}) | "
                  f"{_cell(text)} |" for path, text, _ in commands]
        lines += ["", "## mtpsl", "", "```text", root.format_help().rstrip(), "```"]
        for path, _, parser in commands:
            anchor = "-".join(("mtpsl", *path))
            lines += ["", f"## mtpsl {' '.join(path)} {{#{anchor}}}", "", "```text",
                      parser.format_help().rstrip(), "```"]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines)


# --- the config ---------------------------------------------------------------------------

def _config_rows(section, prefix: str = "") -> Iterator[str]:
    """One table row per leaf key of ``section``, as ``config show`` describes it."""
    from pydantic import BaseModel

    from mtpsl.cli.commands import config_show as show

    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            yield from _config_rows(value, key + ".")
            continue
        meaning = show._one_line(field.description) if field.description else ""
        yield (f"| `{key}` | `{_cell(show._flow(show._plain(value)))}` | "
               f"{_cell(show.allowed(key, field))} | {_cell(meaning)} |")


def _options_table(model) -> list[str]:
    from mtpsl.cli.commands import config_show as show

    if not model.model_fields:
        return ["Takes no options."]
    lines = ["| option | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        value = field.get_default(call_default_factory=True)
        meaning = show._one_line(field.description) if field.description else ""
        lines.append(f"| `{name}` | `{_cell(show._flow(show._plain(value)))}` | "
                     f"{_cell(show.allowed('', field))} | {_cell(meaning)} |")
    return lines


def config_reference() -> str:
    from mtpsl.core.config import Config
    from mtpsl.methods import METHODS
    from mtpsl.weighting import WEIGHTINGS

    config = Config()
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|",
             *_config_rows(config)]
    for title, key, registry in (("method", "method.options", METHODS),
                                 ("weighting", "method.weighting_options", WEIGHTINGS)):
        lines += ["", f"## Options of each {title} (`{key}`)"]
        for name in registry.names():
            lines += ["", f"### `{name}`", "", _cell(registry.describe(name, width=10**6)), "",
                      *_options_table(registry.get(name).Options)]
    return "\n".join(lines)


# --- the registries -----------------------------------------------------------------------

def registries_reference() -> str:
    from mtpsl.cli.commands import listing

    registries = listing._registries()
    lines: list[str] = []
    for kind in listing.KINDS:
        key = "--config NAME" if kind == "presets" else registries[kind][0]
        lines += ["", f"## {kind}", "", f"Named by `{key}`; `mtpsl list {kind}` prints this "
                  "list.", "", "| name | description |", "|---|---|"]
        lines += [f"| `{name}` | {_cell(text)} |"
                  for name, text in listing.entries(kind, width=10**6)]
    return "\n".join(lines).lstrip()


# --- the code layout ----------------------------------------------------------------------

def _summary(path: Path) -> str:
    from mtpsl.core.registry import summary_line

    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    line = summary_line(doc, width=10**6)
    end = re.search(r"\.\s+(?=[A-Z])", line)  # the first sentence ("e.g. x" goes on)
    return line if end is None else line[:end.start() + 1]


def layout_reference() -> str:
    lines: list[str] = []
    packages = sorted({p.parent for p in PACKAGE.rglob("*.py")})
    for package in packages:
        name = ".".join(package.relative_to(PACKAGE.parent).parts)
        modules = sorted(package.glob("*.py"), key=lambda p: (p.name != "__init__.py", p.name))
        lines += ["", f"## `{name}`", "", "| module | what it holds |", "|---|---|"]
        for module in modules:
            shown = f"{name}/" if module.name == "__init__.py" else module.name
            lines.append(f"| `{shown}` | {_cell(_summary(module))} |")
    return "\n".join(lines).lstrip()


# --- the demo table -----------------------------------------------------------------------

def demo_table() -> str:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- demo-table -->", "<!-- /demo-table -->"
    start, stop = readme.find(begin), readme.find(end)
    if start < 0 or stop < start:
        raise RuntimeError(f"README.md has no {begin} ... {end} block")
    return readme[start + len(begin):stop].strip()


GENERATORS: dict[str, Callable[[], str]] = {
    "<!-- mtpsl:cli -->": cli_reference,
    "<!-- mtpsl:config -->": config_reference,
    "<!-- mtpsl:registries -->": registries_reference,
    "<!-- mtpsl:layout -->": layout_reference,
    "<!-- mtpsl:demo-table -->": demo_table,
}


def on_page_markdown(markdown: str, **kwargs) -> str:
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
