"""String-keyed registries: the one place each seam (task, dataset, model, method,
split regime, ...) looks up its entries.

Adding an entry is one decorated class or function; configs name entries by string and an
unknown name fails with the list of known ones.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry mapping that refuses duplicates (a silent overwrite hides a bug)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            key = name or getattr(entry, "__name__", None)
            if not key:
                raise ValueError(f"cannot infer a {self.kind} name for {entry!r}")
            if key in self._entries:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = entry
            return entry

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}"
            ) from None

    def describe(self, name: str, width: int = 100) -> str:
        """The first paragraph of the entry's docstring on one line (for ``mtpsl list``)."""
        return summary_line(inspect.getdoc(self.get(name)) or "", width)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def summary_line(text: str, width: int = 100) -> str:
    """The first paragraph of ``text`` on one line, cut at ``width`` characters."""
    line = " ".join(text.strip().split("\n\n")[0].split())
    line = re.sub(r":\w+:`~?([^`]*)`", r"\1", line).replace("``", "")  # reST roles, literals
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def discover(package: str, path: Iterable[str]) -> None:
    """Import every module of a package (in name order), so each registers its entries:
    adding a task, model, method or weighting is adding a file."""
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        importlib.import_module(f"{package}.{info.name}")
