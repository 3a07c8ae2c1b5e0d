"""Are bf16-autocast metrics on the CPU sound? The demo's SL and XTC, 3 seeds, bf16 vs fp32.

    python benchmarks/amp_check.py --data /tmp/ck/data --work /tmp/ck    # trains 12 runs
    python benchmarks/amp_check.py --data /tmp/ck/data --work /tmp/ck --no-train  # summarise

Trains the ``synthetic_demo`` grid (methods sl and xtc, seeds 0-2) once with ``train.amp=bf16``
and once with ``train.amp=off`` (both channels-last), then writes
``benchmarks/results/cpu_bf16_check.json``: every run's primary metrics and training time,
and per metric the paired difference bf16 − fp32 over the six (method, seed) pairs with its
95% interval, beside the seed-to-seed std of the fp32 runs. bf16 is sound for the demo when
the differences are small against that std and their intervals include 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mtpsl.analysis import stats

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["semantic/miou", "depth/abs_err", "normal/mean"]
METHODS, SEEDS = ["sl", "xtc"], [0, 1, 2]


def train(data: Path, out: Path, amp: str) -> None:
    subprocess.run([sys.executable, "-m", "mtpsl", "compare", "--config", "synthetic_demo",
                    "--out", str(out), "--methods", ",".join(METHODS),
                    "--seeds", ",".join(map(str, SEEDS)), f"dataset.root={data}",
                    "train.progress=false", f"train.amp={amp}", "train.channels_last=true"],
                   check=True)


def final(grid: Path, method: str, seed: int) -> dict:
    return json.loads((grid / "onelabel" / method / f"seed{seed}" / "final_metrics.json")
                      .read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the demo's data (mtpsl data synth)")
    parser.add_argument("--work", required=True, help="folder for the two grids")
    parser.add_argument("--no-train", action="store_true", help="summarise existing grids")
    args = parser.parse_args()
    grids = {amp: Path(args.work) / amp for amp in ("bf16", "off")}
    if not args.no_train:
        for amp, grid in grids.items():
            train(Path(args.data), grid, amp)
    runs = {amp: {f"{m}/seed{s}": final(g, m, s) for m in METHODS for s in SEEDS}
            for amp, g in grids.items()}
    comparison = {}
    for key in KEYS:
        diffs = [runs["bf16"][r]["metrics"][key] - runs["off"][r]["metrics"][key]
                 for r in runs["off"]]
        summary = stats.summarise(diffs)
        seed_std = np.mean([np.std([runs["off"][f"{m}/seed{s}"]["metrics"][key] for s in SEEDS],
                                   ddof=1) for m in METHODS])
        comparison[key] = {"bf16_minus_fp32_mean": summary.mean,
                           "ci95": [summary.low, summary.high],
                           "significant": summary.significant,
                           "fp32_seed_std_mean_over_methods": float(seed_std)}
    seconds = {amp: {r: v["train_seconds_this_session"] for r, v in rs.items()}
               for amp, rs in runs.items()}
    record = {
        "benchmark": "cpu_bf16_check",
        "command": "python benchmarks/amp_check.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "hardware": runs["off"]["sl/seed0"].get("environment", {}).get("hardware"),
        "data": {k: v for k, v in json.loads((Path(args.data) / "synthetic.json").read_text())
                 .items() if k in ("family", "height", "width", "seed", "splits")},
        "test": stats.TEST, "pairs": list(runs["off"]),
        "comparison": comparison, "train_seconds": seconds,
        "metrics": {amp: {r: {k: v["metrics"][k] for k in KEYS} for r, v in rs.items()}
                    for amp, rs in runs.items()},
    }
    path = ROOT / "benchmarks" / "results" / "cpu_bf16_check.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(comparison, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
