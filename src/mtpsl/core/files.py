"""Files that survive a kill: written to a temp file, fsynced, then renamed into place.

A kill mid-write leaves the previous file intact plus a partial ``.NAME.XXXXXXXX.tmp`` beside
it; the next :func:`atomic_write` of the same path removes such leftovers before writing (only
one process writes a run folder at a time: :mod:`mtpsl.core.rundir` holds its lock). Every file gets
the permissions an ordinary ``open()`` would give it (0666 less the umask), not the 0600 of a
temp file. No torch here: config and run-folder code import this before anything heavy.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from mtpsl.core.faults import fault_point


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()


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


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path`` and rename it into place.

    Leftover temp files of an earlier, killed write of the same path are removed first. On
    any failure (a full disk included) the temp file is removed and ``path`` is unchanged.
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
            fault_point(f"write:{path.name}")
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        renamed = named(err, path)
        if renamed is err:
            raise
        raise renamed from err


def write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def write_all(contents: Mapping[str | Path, bytes]) -> None:
    """Several files, all or none: every temp file is written (and synced) first, then each is
    renamed into place, so a full disk leaves every earlier version intact, not a mix of old
    and new files. (A kill between two renames can still leave a mix; each file is whole.)"""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in contents.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in stale_temps(path):
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                fault_point(f"write:{path.name}")
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), FILE_MODE)
    except BaseException as err:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        renamed = named(err, temps[-1][1] if temps else None)
        if renamed is err:
            raise
        raise renamed from err
    for tmp, path in temps:
        os.replace(tmp, path)


def encoded(write: Callable[[BinaryIO], object]) -> bytes:
    """What ``write(file_object)`` writes, in memory (for :func:`write_all`)."""
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def named(err: BaseException, path: Path | None) -> BaseException:
    """An OSError met while writing ``path`` that names ``path`` (a full disk's error from
    ``write``/``fsync`` names no file, a failed temp file names the temp), so the one-line
    error says which file could not be written; anything else unchanged."""
    if not isinstance(err, OSError) or path is None or err.filename == str(path):
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))
