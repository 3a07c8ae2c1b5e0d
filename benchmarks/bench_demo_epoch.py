"""One SL epoch of the demo preset, the whole process, in each precision and memory layout:
issue 27's table measured on this machine, and the scale from it to the issue's CPU.

    python benchmarks/bench_demo_epoch.py            # writes results/demo_epoch_cpu.json

Each cell is ``mtpsl train --config synthetic_demo`` with one epoch (and again with two: the
difference is one epoch without the process's start-up) on the demo's data, timed from outside
(``repeats`` times, the median kept; each on a quiet machine, redone when other processes
took CPU during it: ``quiet.py``). The issue's numbers (a 2-core AMD EPYC Zen 3: AVX2, no
native bf16) are stored beside them; ``scale_to_reference`` (its fp32 NHWC time over ours) is
what ``benchmarks/readme_table.py`` multiplies the fp32 demo record by to estimate the demo on
that class of CPU, which cannot be measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtpsl.data.synthetic import write_nyuv2_layout
from mtpsl.engine.speed import cpu_name, probe_hardware

sys.path.insert(0, str(Path(__file__).parent))
from quiet import quietly  # a sibling script (on the path when run as a script)

RESULTS = Path(__file__).parent / "results"
REFERENCE = {
    "cpu": "AMD EPYC (Zen 3), 2 cores: AVX2, no native bf16",
    "source": "issue 27 (one SL epoch of the demo preset, whole process)",
    "seconds": {"off/true": 8.6, "off/false": 9.4, "bf16/true": 32.5, "bf16/false": 65.0},
}
"""The measurement on the class of CPU this machine is not (keys: train.amp/channels_last)."""
COMBOS = [("off", "true"), ("off", "false"), ("bf16", "true"), ("bf16", "false")]


def run_once(data: Path, work: Path, epochs: int, amp: str, layout: str) -> float:
    run = work / f"run-{epochs}-{amp}-{layout}"
    cmd = [sys.executable, "-m", "mtpsl", "train", "--config", "synthetic_demo", "--run-dir",
           str(run), f"dataset.root={data}", f"train.epochs={epochs}", "train.eval_every=1",
           "train.progress=false", f"train.amp={amp}", f"train.channels_last={layout}"]

    def once() -> None:
        subprocess.run(["rm", "-rf", str(run)], check=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    _, wall, foreign = quietly(once)
    print(f"  {epochs} epoch(s), amp={amp}, channels_last={layout}: {wall:.2f} s "
          f"(others {foreign:.2f} cores)", flush=True)
    return wall


SCALE_NOTE = ("the reference's fp32 NHWC epoch over ours, the reference's being its whole "
              "process less our start-up (the process time of one epoch less an epoch): an "
              "upper bound, since a start-up slower there than here makes its epoch shorter")


def scale_to_reference(cells: dict[str, dict]) -> float:
    """How many times longer an fp32 channels-last demo epoch takes on the reference CPU (see
    ``SCALE_NOTE``): the factor the demo's fp32 training time is multiplied by there."""
    ours = cells["off/true"]
    startup = ours["one_epoch_process_s"] - ours["epoch_s"]
    return (REFERENCE["seconds"]["off/true"] - startup) / ours["epoch_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "demo_epoch_cpu.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    cells: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        write_nyuv2_layout(data, n_train=160, n_val=50, height=64, width=96, progress=False)
        for amp, layout in COMBOS:
            one = [run_once(data, work, 1, amp, layout) for _ in range(args.repeats)]
            two = [run_once(data, work, 2, amp, layout) for _ in range(args.repeats)]
            cell = {"one_epoch_process_s": statistics.median(one),
                    "two_epochs_process_s": statistics.median(two), "all_one": one,
                    "all_two": two}
            cell["epoch_s"] = cell["two_epochs_process_s"] - cell["one_epoch_process_s"]
            cells[f"{amp}/{layout}"] = cell
            print(f"amp={amp} channels_last={layout}: one epoch {cell['one_epoch_process_s']:.1f}"
                  f" s (process), an epoch {cell['epoch_s']:.1f} s", flush=True)
    hw = probe_hardware(torch.device("cpu"))
    record = {
        "benchmark": "bench_demo_epoch",
        "command": "python " + shlex.join(["benchmarks/bench_demo_epoch.py",
                                           *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_name(), "isa": hw.isa, "native_bf16": hw.native_bf16,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "cells": cells, "reference": REFERENCE,
        "scale_to_reference": scale_to_reference(cells),
        "scale_note": SCALE_NOTE,
    }
    out = Path(args.out)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"scale to {REFERENCE['cpu']}: {record['scale_to_reference']:.2f}x; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
