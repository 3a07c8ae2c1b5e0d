"""Run a tiny 2x2x2 grid through submitit's local executor and print what ``mtpsl compare
--status`` shows along the way (the README's example is this script's output):

    python benchmarks/compare_status.py

One cell is preempted by SIGTERM mid-epoch (and requeued by submitit), one fails (a full disk,
injected); then compare runs again and resubmits only the failed cell. CPU, one thread per
cell, about two minutes on two cores. Paths are printed relative to a scratch folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = "runs/grid"
COMPARE = ["compare", "--config", "synthetic_demo", "--out", OUT, "--methods", "stl,sl",
           "--regimes", "onelabel,random", "--seeds", "0,1", "--launcher", "submitit",
           "dataset.root=data/tiny", "train.epochs=2", "train.batch_size=4", "train.amp=off",
           "model.width=0.0625", "train.progress=false", "compare.launcher.cluster=local",
           "compare.launcher.gpus_per_cell=0", "compare.launcher.cpus_per_cell=1",
           "compare.launcher.time_min=60"]
FAULTS = "onelabel/sl/seed0=TERM@step#3;random/stl/seed1=ENOSPC@step#2"


def mtpsl(work: Path, *args: str, **env: str) -> str:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with tempfile.TemporaryFile("w+") as log:  # jobs outlive compare: no pipe to wait on
        subprocess.run([sys.executable, "-m", "mtpsl", *args], cwd=work, env=environ,
                       stdout=log, stderr=subprocess.STDOUT)
        log.seek(0)
        return log.read().replace(f"{work}/", "")


def status(work: Path) -> str:
    return mtpsl(work, "compare", "--status", OUT)


def counts(text: str) -> dict[str, int]:
    """``{"pending": 1, "running": 3, ...}`` from the first line of ``--status``."""
    tail = text.split("\n")[0].rsplit(": ", 1)[1]
    return {state: int(n) for n, state in (item.split() for item in tail.split(", "))}


def until(work: Path, ready, pause: float = 0.5) -> str:
    while not ready(counts(text := status(work))):
        time.sleep(pause)
    return text


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        mtpsl(work, "data", "synth", "--out", "data/tiny", "--n-train", "8", "--n-val", "4",
              "--height", "32", "--width", "48")
        print("$ mtpsl compare ... --launcher submitit   # returns once submitted")
        print(mtpsl(work, *COMPARE, MTPSL_CELL_FAULT=FAULTS))
        text = until(work, lambda n: n["done"] and (n["running"] or n["pending"]))
        print(f"$ mtpsl compare --status {OUT}   # a little later\n{text}")
        text = until(work, lambda n: not n["running"] and not n["pending"], 2)
        print(f"$ mtpsl compare --status {OUT}   # the first round over\n{text}")
        print("$ mtpsl compare ... --launcher submitit --wait   # again: only what is missing")
        print(mtpsl(work, *COMPARE[:COMPARE.index("dataset.root=data/tiny")], "--wait",
                    *COMPARE[COMPARE.index("dataset.root=data/tiny"):]).split("| set-up")[0])
        print(f"$ mtpsl compare --status {OUT}\n{status(work)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
