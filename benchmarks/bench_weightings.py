"""What each loss weighting costs: seconds per training step and peak memory of every
registered strategy relative to ``uniform`` measured in the same run.

Each strategy runs the real training step of ``mtpsl.engine.run`` (SL on NYUv2-like tasks:
13-class segmentation, depth, normals; every label present, so the gradient strategies take
all three task gradients) on a fixed random batch in its own process on the CPU (so each peak
resident memory is its own), in one process with the allocator's peak reset on CUDA. The
gradient strategies pay one backward pass per task through the shared parameters (and hold
the K x P matrix of those gradients); the loss-level ones cost what uniform does. Rows
``<name>@representation`` (``--representation``) and ``mgda_ub`` take the task gradients with
respect to SegNet's decoder output instead: one backward through the heads per task, then one
full backward. Rows ``<name>@gramian`` (``--gramian``) take the Gram matrix of the shared
parameters' gradients from torchjd's autogram engine (one backward vmapped over the tasks,
never the K x P matrix), then one or two backward passes.

    python benchmarks/bench_weightings.py                      # CPU, 64x96, batch 4
    python benchmarks/bench_weightings.py --device cuda --height 288 --width 384 --batch-size 8
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_task_scaling import tasks_of, timed_steps
from bench_train import batch_for, build_run, device_name

from mtpsl.core.config import load_config
from mtpsl.models import shared_parameters
from mtpsl.weighting import WEIGHTINGS

RESULTS = Path(__file__).parent / "results"
TASKS = "3 (NYUv2-like)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--width-mult", type=float, default=0.25, help="SegNet width")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="train.amp of every row, one precision for all (bf16 leaves the "
                        "gramian rows out: the Gram engine runs in fp32 only)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", help="comma-separated strategies (default: every registered one)")
    p.add_argument("--representation", default="mgda,pcgrad,cagrad,upgrad",
                   help="strategies timed once more on the shared representation "
                        "(method.weighting_gradients=representation); '' for none")
    p.add_argument("--gramian", default="mgda,pcgrad,cagrad,upgrad",
                   help="strategies timed once more with the shared parameters' Gram matrix "
                        "from torchjd's autogram (method.weighting_gradients=gramian); '' for "
                        "none")
    p.add_argument("--one", help=argparse.SUPPRESS)  # one strategy, in its own process
    p.add_argument("--out", help="JSON path (default results/weightings_<device>.json)")
    return p.parse_args(argv)


FORMS = ("representation", "gramian")
"""``method.weighting_gradients`` values timed as extra rows ``<name>@<form>``."""


def measure_one(weighting: str, args) -> dict:
    device = torch.device(args.device)
    name, _, form = weighting.partition("@")
    config = load_config(None, [f"method.weighting={name}", f"model.width={args.width_mult}",
                                f"train.batch_size={args.batch_size}", f"train.device={device}",
                                "train.deterministic=false", f"train.amp={args.amp}",
                                *([f"method.weighting_gradients={form}"] if form else [])])
    tasks = tasks_of(TASKS)
    step = build_run(config, tasks, device)
    exp = step.exp
    batch = batch_for(tasks, exp.method.n_views, args, "full").to(device)
    seconds, peak = timed_steps(step, batch, args, weighting)
    return {"s_per_step": seconds, "peak_gib": peak,
            "linear_in_losses": WEIGHTINGS.get(name).linear_in_losses,
            "gradients": exp.weighting.gradients,
            "shared_parameters": sum(p.numel() for p in shared_parameters(exp.model))}


def measure_all(args) -> list[dict]:
    names = args.only.split(",") if args.only else WEIGHTINGS.names()
    names = ["uniform", *[n for n in names if n != "uniform"]]  # the baseline first
    forms = FORMS if args.amp == "off" else ("representation",)  # the Gram engine: fp32 only
    names += [f"{n}@{form}" for form in forms
              for n in filter(None, getattr(args, form).split(","))]
    rows = []
    for name in names:
        rows.append({"weighting": name, **_measure_alone(name, args)})
        print(f"  {name:12s} {rows[-1]['s_per_step']:.3f} s/step", file=sys.stderr, flush=True)
    base = rows[0]
    for row in rows:
        row["time_vs_uniform"] = row["s_per_step"] / base["s_per_step"]
        row["memory_vs_uniform"] = row["peak_gib"] / base["peak_gib"]
    return rows


def _measure_alone(name: str, args) -> dict:
    """One strategy whose peak memory is its own: on CUDA in this process after resetting the
    allocator's peak (one CUDA start-up for all), on the CPU in a process of its own (the
    resident-set peak is process-wide)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return measure_one(name, args)
    cmd = [sys.executable, __file__, "--one", name, *_forwarded(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _forwarded(args) -> list[str]:
    return [f"--device={args.device}", f"--height={args.height}", f"--width={args.width}",
            f"--batch-size={args.batch_size}", f"--width-mult={args.width_mult}",
            f"--steps={args.steps}", f"--warmup={args.warmup}", f"--amp={args.amp}",
            f"--representation={args.representation}", f"--gramian={args.gramian}"]


def table(rows: list[dict]) -> str:
    lines = ["| weighting | s / step | x uniform time | peak memory (GiB) | x uniform memory | "
             "fp16 allowed |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["time_vs_uniform"], r["weighting"])):
        lines.append(f"| {r['weighting']} | {r['s_per_step']:.3f} | {r['time_vs_uniform']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['memory_vs_uniform']:.2f} | "
                     f"{'yes' if r['linear_in_losses'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return
    rows = measure_all(args)
    device = torch.device(args.device)
    record = {
        "benchmark": "weightings",
        "command": "python benchmarks/bench_weightings.py " + shlex.join(_forwarded(args)),
        "date": time.strftime("%Y-%m-%d"),
        "device": device_name(device),
        "torch": torch.__version__,
        "setup": {"height": args.height, "width": args.width, "batch_size": args.batch_size,
                  "model": f"segnet width {args.width_mult}", "method": "sl",
                  "tasks": TASKS, "labels": "full", "amp": args.amp},
        "rows": rows,
        "table": table(rows),
    }
    out = Path(args.out or RESULTS / f"weightings_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(record["table"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
