"""The import graph of ``src/mtpsl``: layers that import only downwards, and no circles.

Layers, lowest first: ``core`` (registry, errors, files, config) <- the plugins (``tasks``,
``metrics``, ``models``, ``methods``, ``weighting``, ``data``) <- ``engine`` (build, loop,
checkpoint, speed, evaluate) <- ``inference`` (load, predict, export) <- ``analysis`` (report,
stats, figures, compare) <- ``cli``. Every import counts, wherever it is written: at module
level, inside a function (a late import still ties two modules together) and under
``TYPE_CHECKING``. The stable top-level aliases (``mtpsl.config``...) are for users: nothing
inside the package imports them.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PLUGINS = ("tasks", "metrics", "models", "methods", "weighting", "data", "presets")
LAYERS = ("core", "plugins", "engine", "inference", "analysis", "cli")


def module_files(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    found = {}
    for path in (src / "mtpsl").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _targets(node: ast.AST, package: str, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        names = [f"{module}.{a.name}" for a in node.names] + [module]
    else:
        return []
    out = []
    for name in names:
        while name and name not in modules:  # an imported attribute: its module
            name = name.rpartition(".")[0]
        if name.startswith("mtpsl"):
            out.append(name)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the mtpsl modules it imports (anywhere in its file)."""
    modules = module_files(src)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            graph[name].update(t for t in _targets(node, package, modules) if t != name)
    return {name: graph[name] for name in modules}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> int | None:
    """The layer's rank, or None for the package itself and its top-level aliases."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    top = parts[1]
    if top == "__main__":
        return LAYERS.index("cli")
    if top in PLUGINS:
        return LAYERS.index("plugins")
    return LAYERS.index(top) if top in LAYERS else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for each import of a higher layer, or of a top-level alias, from a layer."""
    bad = []
    for module, targets in graph.items():
        here = layer_of(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if target != "mtpsl" and (there is None or there > here):
                bad.append(f"{module} -> {target}")
    return bad


def test_every_module_is_in_a_layer_or_an_alias():
    stray = [m for m in module_files() if layer_of(m) is None and m.count(".") > 1]
    assert stray == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_layers_import_only_downwards():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_circle_finder(edges, expected):
    assert circles(edges) == expected


def test_the_checks_see_late_and_type_checking_imports(tmp_path):
    """A function-level import and a TYPE_CHECKING import are edges: the circle and the
    upward import they make are found (the guard against a test that cannot fail)."""
    pkg = tmp_path / "mtpsl"
    for sub in ("core", "engine"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from mtpsl.engine import b\n")
    (pkg / "engine" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mtpsl.core.a import f\n")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["mtpsl.core.a", "mtpsl.engine.b"]]
    assert upward_imports(graph) == ["mtpsl.core.a -> mtpsl.engine",
                                     "mtpsl.core.a -> mtpsl.engine.b"]
