"""How the cost of cross-task regularisation grows with the number of tasks: XTC (one mapping
pass per task pair) against JTR (one joint auto-encoder), with plain SL as the baseline
measured in the same run, at 2, 3 and 5 tasks (Cityscapes-, NYUv2- and PASCAL-like heads).

Every (regime, task set, method) runs the real training step of ``mtpsl.engine.run`` on a fixed
random batch in its own process, so each peak resident memory is its own; the table gives
seconds per step, peak memory and both as ratios to SL on the same tasks. With one label per
image XTC maps K - 1 pairs per image, with every label K (K - 1): the regime is where the
pairwise cost shows.

    python benchmarks/bench_task_scaling.py                      # CPU, 64x96, batch 4
    python benchmarks/bench_task_scaling.py --device cuda --height 288 --width 384
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import batch_for, build_run, device_name, peak_memory, sync, train_step

from mtpsl.core.config import load_config
from mtpsl.data.batch import Batch
from mtpsl.engine.step import TrainStep
from mtpsl.tasks import Task, build_task

RESULTS = Path(__file__).parent / "results"
TASK_SETS: dict[str, dict[str, tuple[str, dict]]] = {
    "2 (Cityscapes-like)": {"semantic": ("segmentation", {"num_classes": 7}),
                            "depth": ("depth", {})},
    "3 (NYUv2-like)": {"semantic": ("segmentation", {"num_classes": 13}),
                       "depth": ("depth", {}), "normal": ("normal", {})},
    "5 (PASCAL-like)": {"semantic": ("segmentation", {"num_classes": 21}),
                        "parts": ("segmentation", {"num_classes": 7}),
                        "normal": ("normal", {}), "saliency": ("saliency", {}),
                        "edges": ("edge", {})},
}
METHODS = {"sl": [], "xtc": ["method.options.con_weight=2.0"], "jtr": []}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width-mult", type=float, default=0.25, help="SegNet (and JTR's) width")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--regimes", default="onelabel,full", help="comma-separated: onelabel, full")
    p.add_argument("--one", help=argparse.SUPPRESS)  # "method|task set|regime": one run
    p.add_argument("--out", help="JSON path (default results/task_scaling_<device>.json)")
    return p.parse_args(argv)


def tasks_of(name: str) -> dict[str, Task]:
    return {n: build_task(kind, n, **kw) for n, (kind, kw) in TASK_SETS[name].items()}


def measure_one(method: str, task_set: str, regime: str, args) -> dict:
    device = torch.device(args.device)
    config = load_config(None, [f"method.name={method}", f"model.width={args.width_mult}",
                                f"train.batch_size={args.batch_size}", f"train.device={device}",
                                "train.deterministic=false", *METHODS[method],
                                *([f"method.options.ae_width={args.width_mult}"]
                                  if method == "jtr" else [])])
    tasks = tasks_of(task_set)
    step = build_run(config, tasks, device)
    batch = batch_for(tasks, step.exp.method.n_views, args, regime).to(device)
    seconds, peak = timed_steps(step, batch, args, f"{method} on {task_set}")
    method_params = sum(p.numel() for p in step.exp.method.parameters())
    return {"s_per_step": seconds, "peak_gib": peak, "method_parameters": method_params}


def timed_steps(step: TrainStep, batch: Batch, args, what: str) -> tuple[float, float]:
    """Seconds per training step after ``args.warmup`` steps, over ``args.steps``, and the peak
    memory in GiB (GPU allocations on CUDA, the process's resident set on CPU)."""
    device = step.device
    step.exp.model.train()
    step.exp.method.train()
    for _ in range(args.warmup):
        train_step(step, batch)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(step, batch)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    assert torch.isfinite(loss), f"{what} diverged"
    memory = peak_memory(device, args.batch_size)
    peak = memory["peak_gpu_gib"] if device.type == "cuda" else memory["peak_rss_gib_process"]
    return seconds, peak


def measure_all(args) -> list[dict]:
    rows = []
    for regime in args.regimes.split(","):
        for task_set in TASK_SETS:
            for method in METHODS:
                cmd = [sys.executable, __file__, "--one", f"{method}|{task_set}|{regime}",
                       *_forwarded(args)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append({"regime": regime, "tasks": task_set, "method": method,
                             **json.loads(out.stdout)})
                print(f"  {regime:8s} {task_set:22s} {method:4s} "
                      f"{rows[-1]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    for row in rows:
        base = next(r for r in rows if r["tasks"] == row["tasks"] and r["method"] == "sl"
                    and r["regime"] == row["regime"])
        row["time_vs_sl"] = row["s_per_step"] / base["s_per_step"]
        row["memory_vs_sl"] = row["peak_gib"] / base["peak_gib"]
    return rows


def _forwarded(args) -> list[str]:
    return [f"--device={args.device}", f"--height={args.height}", f"--width={args.width}",
            f"--batch-size={args.batch_size}", f"--width-mult={args.width_mult}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--regimes={args.regimes}"]


def table(rows: list[dict]) -> str:
    lines = ["| labels | tasks | method | s / step | x SL time | peak memory (GiB) | "
             "x SL memory | method's own parameters |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['tasks']} | {r['method']} | {r['s_per_step']:.3f} | "
                     f"{r['time_vs_sl']:.2f} | {r['peak_gib']:.2f} | {r['memory_vs_sl']:.2f} | "
                     f"{r['method_parameters']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        method, task_set, regime = args.one.split("|")
        print(json.dumps(measure_one(method, task_set, regime, args)))
        return
    rows = measure_all(args)
    device = torch.device(args.device)
    record = {
        "benchmark": "task_scaling",
        "command": "python benchmarks/bench_task_scaling.py " + shlex.join(_forwarded(args)),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(device),
        "torch": torch.__version__,
        "setup": {"height": args.height, "width": args.width, "batch_size": args.batch_size,
                  "model": f"segnet width {args.width_mult}",
                  "jtr_ae_width": args.width_mult, "xtc_mapper": "segnet (default)"},
        "rows": rows,
        "table": table(rows),
    }
    out = Path(args.out or RESULTS / f"task_scaling_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(record["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
