"""Errors users see. Each names the thing at fault (a file, a config key) and what is wrong.

The CLI prints every :class:`MtpslError` as one line ``error: <message>`` and exits with the
error's ``exit_code`` (2 unless a subclass says otherwise); anything else is a bug in mtpsl and
keeps its traceback (see :func:`mtpsl.cli.app.main`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

EXIT_ERROR = 2
"""A bad config, dataset, file or run folder."""
EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGUSR1 after writing a checkpoint; ``--resume`` continues (EX_TEMPFAIL:
a scheduler's requeue hook can test for it)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), after saying where the last checkpoint is."""


class MtpslError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""

    exit_code = EXIT_ERROR


class DataError(MtpslError):
    """A dataset folder, file or split file is missing or malformed."""


class ConfigError(MtpslError):
    """A config key or value is invalid."""


class RunFolderError(MtpslError):
    """A run folder is in use, already holds another run, or does not match its checkpoint."""


class CheckpointError(DataError):
    """A checkpoint file is unreadable, corrupt, of the wrong structure or non-finite."""


class NonFiniteResultError(MtpslError):
    """A model's outputs or metrics are NaN/inf: the run diverged, and what it gives is neither
    saved nor served. ``found`` names each non-finite item (``task/metric = nan``, or
    ``task (predictions NaN/inf)``) so a caller can reword the error with its own context."""

    def __init__(self, message: str, found: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.found = list(found)

    def summary(self, prefix: str = "") -> str:
        """``found`` for a one-line message, each item prefixed (e.g. ``eval/``)."""
        return listed([f"{prefix}{item}" for item in self.found])


def listed(items: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` items, comma-separated, ``...`` when there are more."""
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


class Preempted(MtpslError):
    """SIGTERM/SIGUSR1: the run stopped at a step boundary with a checkpoint to resume from."""

    exit_code = EXIT_PREEMPTED


class Interrupted(MtpslError):
    """Ctrl-C during training; the message says where the last checkpoint is."""

    exit_code = EXIT_INTERRUPTED


_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")


def strip_worker_traceback(message: str) -> str:
    """The original message of an error re-raised from a DataLoader worker.

    torch re-raises a worker's exception with the worker's whole traceback folded into the
    message; the user needs only its last line (``pkg.Error: <what>``), without the class path.
    """
    if not _WORKER_HEADER.search(message) or "Original Traceback" not in message:
        return message
    lines = message.split("Original Traceback", 1)[1].splitlines()[1:]
    start = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return message
    text = "\n".join(lines[start:]).strip()
    name, sep, rest = text.partition(": ")
    return rest if sep and re.fullmatch(r"[\w.]+", name) else text
