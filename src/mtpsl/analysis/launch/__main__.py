"""``python -m mtpsl.analysis.launch OUT CELL --job J [--threads N] [--cores 0,1]``: one grid
cell in a process of its own (the local launcher's ``--jobs N``). The process is pinned to its
cores here, before torch is imported and starts its threads (which inherit the pinning), so
that the cores each cell may use, and what ``train.threads`` / ``train.num_workers: auto``
derive from them, are its own."""

from __future__ import annotations

import os
import sys


def _pin(argv: list[str]) -> None:
    if "--cores" in argv and hasattr(os, "sched_setaffinity"):
        cores = argv[argv.index("--cores") + 1]
        os.sched_setaffinity(0, {int(c) for c in cores.split(",")})


if __name__ == "__main__":
    _pin(sys.argv[1:])
    from mtpsl.analysis.launch.cell import main

    sys.exit(main())
