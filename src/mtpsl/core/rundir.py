"""A run folder belongs to one run, written by one process at a time.

Every process that writes a run folder (``train``, ``train --resume``, ``eval --out`` into it)
holds an exclusive ``flock`` on ``RUN/.lock`` for as long as it lives; the kernel drops it when
the process ends, however it ends (a SIGKILL included), so a stale lock never blocks a resume.
A new run refuses a folder that already holds one, and a run that fails before its first
training step removes what it wrote (see :func:`claim_new`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path
from types import ModuleType

from mtpsl.core.errors import RunFolderError

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs still work, unguarded
    fcntl = None

LOCK_NAME = ".lock"
RUN_FILES = ("checkpoint.pt", "final_metrics.json", "config.yaml", "split.json",
             "metrics.jsonl", "metrics.csv")
"""Files whose presence means a folder holds a run."""


class RunLock:
    """An exclusive, non-blocking lock on a run folder, held until :meth:`release`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.run_dir} is in use by another mtpsl process (pid {holder}); "
                "wait for it to finish or pick another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run(run_dir: Path) -> list[str]:
    """The run files present in ``run_dir`` (empty: no run there)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


class NewRun:
    """A locked, empty run folder for a new run; :meth:`abandon` undoes it on failure."""

    def __init__(self, run_dir: Path, created: bool, lock: RunLock) -> None:
        self.run_dir, self.created, self.lock = run_dir, created, lock

    def abandon(self) -> None:
        """Remove everything this run wrote (the folder too, if it made it)."""
        for entry in self.run_dir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.lock.release()
        if self.created:
            with suppress(OSError):
                (self.run_dir / LOCK_NAME).unlink()
                self.run_dir.rmdir()


def claim_new(run_dir: str | Path, created: bool = False) -> NewRun:
    """Create or open ``run_dir``, lock it and check that it holds no run yet.

    ``created``: the caller has just made the folder (it is removed again on failure).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file")
    created = created or not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    present = holds_run(run_dir)
    if present:
        lock.release()
        hint = (f"continue it with `mtpsl train --resume {run_dir}`"
                if (run_dir / "checkpoint.pt").exists() else "it has no checkpoint to resume")
        raise RunFolderError(
            f"run folder {run_dir} already holds a run ({', '.join(present)}); {hint}, or "
            "pass another --run-dir (or none, for a fresh folder under output_dir)"
        )
    return NewRun(run_dir, created, lock)


def lock_if_run_folder(path: str | Path) -> RunLock | None:
    """The lock of the run folder ``path`` writes into, if ``path`` lies in one."""
    folder = Path(path).parent
    if (folder / LOCK_NAME).exists() or holds_run(folder):
        return RunLock(folder).acquire()
    return None
