"""Timings on a shared machine: wait until it is quiet, and measure how much CPU the rest of
the machine took while a measurement ran, so a disturbed one is redone instead of recorded.

On 2 cores a neighbour's process is more than noise: torch's OpenMP threads wait for each
other at every parallel region, and one of them descheduled stalls the others (a demo epoch
measured 8 s quiet took over 60 s beside a test run). ``foreign`` is the CPU time of every
other process (and the hypervisor's steal) during the measurement, in cores: busy time from
/proc/stat less this process's and its children's own.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (steal included) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user/nice
    return (sum(fields) - idle - guest) / TICK


def _own_seconds() -> float:
    mine = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its wall seconds, and the other processes' CPU over it, in cores."""
    busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
    value = fn()
    wall = time.perf_counter() - start
    foreign = (_busy_seconds() - busy) - (_own_seconds() - own)
    return value, wall, max(0.0, foreign) / max(wall, 1e-9)


def wait_quiet(max_load: float = 0.5, settle: float = 5.0, give_up: float = 3600.0) -> float:
    """Block until the other processes use under ``max_load`` cores over ``settle`` seconds
    (or ``give_up`` seconds passed); returns that share."""
    deadline = time.monotonic() + give_up
    while True:
        _, _, foreign = measured(lambda: time.sleep(settle))
        if foreign < max_load or time.monotonic() > deadline:
            return foreign
        time.sleep(20)


def quietly(fn: Callable[[], T], tries: int = 10, max_foreign: float = 0.15,
            wait_load: float = 0.3) -> tuple[T, float, float]:
    """``measured(fn)`` on a quiet machine, redone (after waiting for quiet again) while the
    others took more than ``max_foreign`` cores during it; the last try is kept either way."""
    for k in range(tries):
        wait_quiet(wait_load)
        value, wall, foreign = measured(fn)
        if foreign <= max_foreign or k == tries - 1:
            return value, wall, foreign
        print(f"  (disturbed: others took {foreign:.2f} cores; again)", flush=True)
    raise AssertionError("unreachable")
