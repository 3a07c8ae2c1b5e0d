"""Named fault points, so tests can kill or break a real ``mtpsl`` process at an exact place.

``MTPSL_FAULT=ACTION@POINT#N`` makes the N-th (1-based) arrival at ``fault_point(POINT)``
perform ACTION: ``KILL`` (SIGKILL to this process: no cleanup, like a crash or the OOM killer),
``TERM`` / ``USR1`` (the signal a cluster scheduler sends before preempting a job), ``INT``
(Ctrl-C) or ``ENOSPC`` (an OSError "No space left on device", as a full disk gives). Several
faults are separated by commas. Unset (the normal case), ``fault_point`` is one dict lookup.

Points: ``step`` (after an optimiser step), ``backward`` (after a backward pass, before the
step), ``eval`` (after an evaluation batch), ``epoch`` (after an epoch's row is logged) and
``write:<file name>`` (inside :func:`mtpsl.core.files.atomic_write`, after the data is in the temp
file and before it replaces the old one).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "MTPSL_FAULT"
_counts: dict[str, int] = {}


def _plan() -> dict[str, tuple[str, int]]:
    plan = {}
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        action, _, rest = item.strip().partition("@")
        point, _, nth = rest.rpartition("#")
        plan[point] = (action.upper(), int(nth))
    return plan


def fault_point(point: str) -> None:
    """Do the planned fault if this is the planned arrival at ``point``."""
    if ENV not in os.environ:
        return
    planned = _plan().get(point)
    if planned is None:
        return
    _counts[point] = _counts.get(point, 0) + 1
    action, nth = planned
    if _counts[point] != nth:
        return
    if action == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {point})")
    os.kill(os.getpid(), getattr(signal, f"SIG{action}"))
