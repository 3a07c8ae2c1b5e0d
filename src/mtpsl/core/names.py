"""Registered names read from the plugins' source, so the CLI can check a config without
importing them (they import torch, which costs seconds before the first error).

The plugin packages register their entries with decorators (``@METHODS.register("xtc")``);
:func:`scan` finds those decorators and the ``Registry("kind")`` assignments in the source
files, without executing them. The index is rebuilt from the files in every process (a new
plugin file is seen at once; a scan takes milliseconds) and kept equal to the imported
registries by ``tests/test_fast_errors.py``. :func:`preflight` checks a config's names and
paths with it, in the order (and with the messages) of the full check that runs later, after
the import (:func:`mtpsl.engine.build.check_names` and the builders).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import itertools
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mtpsl.core.config import REQUIRED_WEIGHTS, Config, trained_model
from mtpsl.core.errors import ConfigError, DataError

PLUGIN_PACKAGES = ("tasks", "metrics", "models", "methods", "weighting", "data")
"""Packages whose modules register entries (each discovers all of its modules)."""
LOG_PACKAGES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"),
                "mlflow": ("mlflow", "mlflow")}
"""``log.backends`` name -> (the module it imports, the mtpsl extra that installs it)."""
ROOT_IS_A_PARENT = frozenset({"cross_domain"})
"""Datasets whose ``dataset.root`` only prefixes their sources' folders (each source checks
its own folder when it is opened), so the root itself need not exist."""


@dataclass(frozen=True)
class Entry:
    """One registered entry as its source declares it."""

    name: str
    params: tuple[str, ...] | None
    """Parameters of the decorated function (or of the class's ``__init__``); None when the
    source does not say (a class without its own ``__init__``)."""


@dataclass
class NameIndex:
    """Registry variable (``METHODS``) -> its kind and entries, as the source declares them."""

    kinds: dict[str, str] = field(default_factory=dict)
    entries: dict[str, dict[str, Entry]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)
    """Registry variable -> the dotted module that declares it (for mtpsl's own sources)."""

    def names(self, registry: str) -> list[str]:
        """The source's names and, where its module is already imported (a notebook, a test,
        a user's script registering its own), those registered at run time."""
        module = sys.modules.get(self.modules.get(registry, ""))
        live = getattr(module, registry, None) if module is not None else None
        return sorted({*self.entries.get(registry, {}), *(live.names() if live else ())})

    def entry(self, registry: str, name: str) -> Entry | None:
        return self.entries.get(registry, {}).get(name)

    def check(self, registry: str, name: str, key: str) -> Entry:
        """The entry, or the ConfigError of :func:`mtpsl.engine.build.lookup` (key, name,
        the registered names)."""
        found = self.entry(registry, name)
        if found is None and name in self.names(registry):
            return Entry(name, None)  # registered at run time: the full check judges it
        if found is None:
            raise ConfigError(f"{key}: unknown {self.kinds.get(registry, registry.lower())} "
                              f"{name!r}; known: {', '.join(self.names(registry))}")
        return found


def scan(files: Iterable[Path]) -> NameIndex:
    """The registries declared and the entries registered in ``files`` (Python sources)."""
    index = NameIndex()
    for path in sorted(files):
        text = path.read_text(encoding="utf-8")
        if "Registry(" in text or ".register(" in text:  # most files: no parse needed
            for tree in _parsed_parts(text, str(path)):
                _scan_module(tree, index, _module_name(path))
    return index


def _module_name(path: Path) -> str:
    """``.../src/mtpsl/models/base.py`` -> ``mtpsl.models.base`` ('' outside the package)."""
    parts = path.with_suffix("").parts
    if "mtpsl" not in parts:
        return ""
    dotted = parts[len(parts) - 1 - parts[::-1].index("mtpsl"):]
    return ".".join(dotted[:-1] if dotted[-1] == "__init__" else dotted)


_TOP_LEVEL = re.compile(r"^(?=[^\s)\]}])", re.MULTILINE)
"""The start of a line that starts a top-level statement (or a comment)."""


def _parsed_parts(text: str, filename: str) -> list[ast.Module]:
    """The top-level statements of ``text`` that mention a registry, each parsed alone (a
    tenth of the time of parsing the module: the CLI's start-up); the whole module when a
    part does not parse on its own (a string with lines at column 0)."""
    starts = [m.start() for m in _TOP_LEVEL.finditer(text)] + [len(text)]
    parts: list[str] = []
    pending = ""
    for begin, end in itertools.pairwise(starts):
        piece = text[begin:end]
        chunk, pending = pending + piece, ""
        if piece.startswith("@"):  # a decorator: parsed with what it decorates
            pending = chunk
            continue
        if ("Registry(" in chunk or ".register(" in chunk):
            parts.append(chunk)
    try:
        return [ast.parse(part, filename) for part in parts]
    except SyntaxError:
        return [ast.parse(text, filename)]


def plugin_files(root: Path | None = None) -> list[Path]:
    """Every module of the plugin packages under ``root`` (default: this installation)."""
    root = root or Path(__file__).resolve().parents[1]
    return [path for package in PLUGIN_PACKAGES for path in (root / package).rglob("*.py")]


@functools.cache
def registered() -> NameIndex:
    """The index of this installation's plugin packages (scanned once per process)."""
    return scan(plugin_files())


def _scan_module(tree: ast.Module, index: NameIndex, module: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            _declaration(node, index, module)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            for decorator in node.decorator_list:
                _registration(decorator, node, index)


def _declaration(node: ast.Assign | ast.AnnAssign, index: NameIndex, module: str) -> None:
    """``METHODS: Registry[...] = Registry("method")``."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    call = node.value
    if (isinstance(call, ast.Call) and _called_name(call.func) == "Registry" and call.args
            and isinstance(kind := call.args[0], ast.Constant) and isinstance(kind.value, str)):
        for target in targets:
            if isinstance(target, ast.Name):
                index.kinds[target.id] = kind.value
                if module:
                    index.modules[target.id] = module


def _registration(decorator: ast.expr, node: ast.FunctionDef | ast.ClassDef,
                  index: NameIndex) -> None:
    """``@METHODS.register("xtc")``, ``@METHODS.register(name="xtc")`` or
    ``@METHODS.register()`` (the entry's own name)."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register" and isinstance(decorator.func.value, ast.Name)):
        return
    given = [*decorator.args[:1], *(k.value for k in decorator.keywords if k.arg == "name")]
    name = node.name
    if given:
        if not (isinstance(given[0], ast.Constant) and isinstance(given[0].value, str)):
            return  # a computed name: only the import knows it
        name = given[0].value
    registry = decorator.func.value.id
    index.entries.setdefault(registry, {})[name] = Entry(name, _params(node))


def _params(node: ast.FunctionDef | ast.ClassDef) -> tuple[str, ...] | None:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body
                     if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return None
        return _params(init)[1:]  # type: ignore[index]  # without self
    args = node.args
    return tuple(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def preflight(config: Config, index: NameIndex | None = None) -> None:
    """The errors of a config that need no import of the plugins: every registered name it
    uses, then the dataset root, the split file and the encoder's weights file, each a
    :class:`ConfigError` or :class:`DataError` worded as the full check words it; then the
    packages of the logging backends (found, not imported)."""
    index = index or registered()
    dataset = index.check("DATASETS", config.dataset.name, "dataset.name")
    model = index.check("MODELS", *trained_model(config))
    index.check("METHODS", config.method.name, "method.name")
    index.check("WEIGHTINGS", config.method.weighting, "method.weighting")
    if config.labels.file is None:
        index.check("REGIMES", config.labels.regime, "labels.regime")
    _check_extra_tasks(config, dataset, index)
    backbone = config.model.backbone
    takes_backbone = model.params is not None and "backbone" in model.params
    if takes_backbone:
        index.check("ENCODERS", backbone.name, "model.backbone.name")
        if config.train.require_weights and backbone.weights is None:
            raise ConfigError(REQUIRED_WEIGHTS)
    _check_paths(config, takes_backbone)
    for backend in config.log.backends:
        module, _extra = LOG_PACKAGES.get(backend, (None, None))
        if module is not None and importlib.util.find_spec(module) is None:
            raise missing_backend(backend, module)


def missing_backend(backend: str, module: str) -> ConfigError:
    """The error of a ``log.backends`` entry whose package is not installed."""
    extra = LOG_PACKAGES.get(backend, (None, None))[1]
    hint = f"pip install 'mtpsl[{extra}]'" if extra else f"pip install {module}"
    return ConfigError(f"log.backends: {backend} needs the package {module!r}, which is not "
                       f"installed ({hint})")


def _check_extra_tasks(config: Config, dataset: Entry, index: NameIndex) -> None:
    """``dataset.options.extra_tasks.<name>.type`` of a dataset that takes extra tasks."""
    extra = config.dataset.options.get("extra_tasks")
    if dataset.params is None or "extra_tasks" not in dataset.params or not isinstance(
            extra, dict):
        return
    for name, spec in extra.items():
        if isinstance(spec, dict) and isinstance(spec.get("type"), str):
            index.check("TASKS", spec["type"], f"dataset.options.extra_tasks.{name}.type")


def _check_paths(config: Config, takes_backbone: bool) -> None:
    root = Path(config.dataset.root)
    if config.dataset.name not in ROOT_IS_A_PARENT and not root.is_dir():
        raise DataError(f"dataset root {root} does not exist")
    if config.labels.file is not None and not Path(config.labels.file).is_file():
        raise DataError(f"split file {Path(config.labels.file)} does not exist")
    weights = config.model.backbone.weights
    if takes_backbone and weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.backbone.weights: {Path(weights)} does not exist (weights "
                          "are never downloaded; give a local checkpoint)")
