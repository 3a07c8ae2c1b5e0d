"""Checkpoints that survive a kill: written to a temp file, fsynced, then renamed into place.

A kill mid-write leaves the previous file intact plus a partial ``.NAME.XXXXXXXX.tmp`` beside
it; the next :func:`atomic_write` of the same path removes such leftovers before writing (so
only one process may write a given path at a time, which a run folder guarantees).

They hold only tensors and plain containers, so they load with ``torch.load(weights_only=True)``
and reading one never runs pickled code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import DataError


def _temp_pattern(path: Path) -> re.Pattern:
    # exactly what mkstemp(prefix=".NAME.", suffix=".tmp") makes: 8 chars of [a-z0-9_]
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")


def stale_temps(path: str | Path) -> list[Path]:
    """Temp files a killed :func:`atomic_write` of ``path`` left behind."""
    path = Path(path)
    pattern = _temp_pattern(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


def atomic_write(path: str | Path, write: callable) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path`` and rename it into place.

    Leftover temp files of an earlier, killed write of the same path are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temps(path):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated or unsafe pickles raise many types
        raise DataError(f"checkpoint {path} cannot be loaded safely: {err}") from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
