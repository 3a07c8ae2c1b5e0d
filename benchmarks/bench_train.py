"""Training throughput: XTC's batched consistency against its per-sample reference form.

One run measures both forms on the same synthetic in-memory batch, same model and the real
training step of ``mtpsl.engine.run`` (autocast, loss scaling, weighting backward, optimisers):
images/s, their ratio, peak memory and model FLOP utilisation (FLOPs of one step counted by
``torch.utils.flop_counter.FlopCounterMode``, divided by the step time and by the device's
dense peak). Methods other than XTC are timed once (``--method sl``), e.g. for the demo.

    python benchmarks/bench_train.py --device cuda --batch-size 2 --amp bf16 --channels-last
    python benchmarks/bench_train.py --device cpu --height 64 --width 96 --width-mult 0.25
    python benchmarks/bench_train.py --preset synthetic_demo --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtpsl.core.config import load_config
from mtpsl.core.distributed import DistEnv
from mtpsl.data.batch import Batch, View
from mtpsl.engine.build import (
    Experiment,
    build_model_for,
    method_for,
    seed_everything,
    weighting_for,
)
from mtpsl.engine.callbacks.hooks import method_after_step, weighting_after_step
from mtpsl.engine.speed import to_channels_last
from mtpsl.engine.step import TrainStep, prepare_training
from mtpsl.tasks import Task, build_task

RESULTS = Path(__file__).parent / "results"

PEAK_TFLOPS = {
    # dense tensor-core peaks (no sparsity), TFLOP/s: (bf16/fp16, tf32)
    "H100": (989.0, 494.7),
    "H200": (989.0, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "A10G": (125.0, 62.5),
}
"""fp32 runs use the TF32 peak: cuDNN convolutions use TF32 by default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", help="take method, model width and batch size from a preset")
    p.add_argument("--method", help="xtc (default): batched vs per_sample; else one path")
    p.add_argument("--batch-size", type=int, help="default 2 (or the preset's)")
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--regime", choices=["onelabel", "full"], default="onelabel")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cudnn)")
    p.add_argument("--width-mult", type=float, help="SegNet channel multiplier (default 1.0)")
    p.add_argument("--skip-per-sample", action="store_true", help="time the batched path only")
    p.add_argument("--out", help="JSON path (default results/bench_train_<device>.json)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, implementation: str | None):
    """The preset (or the defaults) with the command line's choices on top."""
    given = {
        "method.name": args.method,
        "model.width": args.width_mult,
        "train.batch_size": args.batch_size,
    }
    if not args.preset:
        given = {"method.name": "xtc", "model.width": 1.0, "train.batch_size": 2} | {
            k: v for k, v in given.items() if v is not None
        }
    overrides = [f"{k}={v}" for k, v in given.items() if v is not None]
    overrides += [
        f"train.amp={args.amp}",
        f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={str(args.compile).lower()}",
        f"train.device={args.device}",
        "train.deterministic=false",
    ]
    if implementation:
        overrides.append(f"method.options.implementation={implementation}")
    return load_config(args.preset, overrides)


def nyuv2_tasks() -> dict:
    return {
        "semantic": build_task("segmentation", "semantic", num_classes=13),
        "depth": build_task("depth", "depth"),
        "normal": build_task("normal", "normal"),
    }


def label_like(task: Task, b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A valid label: the task's hard label of a random prediction (binary ones at 0/1)."""
    label = task.hard_label(task.activate(torch.randn(b, task.out_channels, h, w, generator=g)))
    if task.continuous:
        return label.abs() + 0.5
    if task.label_dims == 1:  # binary maps (continuous ones returned above)
        return (label > 0.5).float()
    return label


def batch_for(tasks: dict[str, Task], n_views: int, args, regime: str) -> Batch:
    """A fixed random batch (seeded) of any tasks: images, valid labels, one label per image
    (``onelabel``) or all (``full``), and an identity augmentation record per view."""
    g = torch.Generator().manual_seed(0)
    b, h, w = args.batch_size, args.height, args.width
    views = [View(torch.rand(b, 3, h, w, generator=g),
                  {n: label_like(t, b, h, w, g) for n, t in tasks.items()},
                  identity_augmentation(b))
             for _ in range(n_views)]
    labelled = torch.zeros(b, len(tasks), dtype=torch.bool)
    labelled[torch.arange(b), torch.arange(b) % len(tasks)] = True  # one label per image
    if regime == "full":
        labelled[:] = True
    return Batch(views, labelled, torch.arange(b), tuple(tasks))


def identity_augmentation(batch: int) -> dict[str, torch.Tensor]:
    """The record of an augmentation that changed nothing (crop scale 1 at the origin, no
    flip): two-view methods (SSL, mean teacher, pseudo-label) replay it onto view0."""
    return {"crop": torch.tensor([[1.0, 0.0, 0.0]]).repeat(batch, 1),
            "flip": torch.zeros(batch, dtype=torch.bool)}


def build_run(config, tasks: dict, device: torch.device) -> TrainStep:
    seed_everything(0, False)
    method = method_for(config, tasks)
    model = build_model_for(config, tasks, method)
    method.attach(model)
    weighting = weighting_for(config, tuple(tasks))
    exp = Experiment(config, tasks, None, None, None, None, model, method, weighting)
    return prepare_training(exp, DistEnv(), device)


def train_step(step: TrainStep, batch: Batch) -> torch.Tensor:
    """The loop's step (mtpsl.engine.trainer.Trainer.train_steps) in one process, without
    the divergence check: forward/backward, unscale, update, the after-step hooks."""
    terms = step.forward_backward(batch)
    step.reduce_gradients()
    step.update()
    method_after_step(step)
    weighting_after_step(step, batch)
    return terms["total"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config, args, device: torch.device) -> dict:
    tasks = nyuv2_tasks()
    step = build_run(config, tasks, device)
    exp = step.exp
    batch = batch_for(tasks, exp.method.n_views, args, args.regime).to(device)
    batch = to_channels_last(batch, config.train.channels_last)
    exp.model.train()
    exp.method.train()
    for _ in range(args.warmup):
        train_step(step, batch)
    with FlopCounterMode(display=False) as counter:
        train_step(step, batch)
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(step, batch)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    assert torch.isfinite(loss), "the benchmark step diverged"
    return {
        "s_per_step": seconds,
        "images_per_s": args.batch_size / seconds,
        "flops_per_step": flops,
        "tflops_per_image": flops / args.batch_size / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": mfu(flops / seconds, device, args.amp),
        **peak_memory(device, args.batch_size),
    }


def mfu(flops_per_s: float, device: torch.device, amp: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (low, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return flops_per_s / ((low if amp != "off" else tf32) * 1e12)
    return None


def peak_memory(device: torch.device, batch: int) -> dict:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        return {"peak_gpu_gib": peak, "peak_gpu_gib_per_image": peak / batch}
    # ru_maxrss is KiB on Linux; a process-wide high-water mark (covers earlier paths too)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"peak_rss_gib_process": rss, "peak_gpu_gib": None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    probe = build_config(args, None)
    args.method, args.width_mult = probe.method.name, probe.model.width
    args.batch_size = probe.train.batch_size
    paths = (
        {"batched": "batched", "per_sample": "per_sample"}
        if args.method == "xtc"
        else {args.method: None}
    )
    if args.skip_per_sample:
        paths.pop("per_sample", None)
    results = {}
    for label, implementation in paths.items():
        results[label] = measure(build_config(args, implementation), args, device)
        r = results[label]
        print(
            f"{label:>11}: {r['images_per_s']:8.2f} img/s  {r['s_per_step'] * 1e3:8.1f} ms/step"
            f"  {r['tflops_per_image']:.3f} TFLOP/img  MFU {fmt(r['mfu'], '.1%')}"
            f"  peak GPU {fmt(r['peak_gpu_gib'], '.2f')} GiB"
        )
    report = {
        "benchmark": "bench_train",
        "device": device_name(device),
        "torch": torch.__version__,
        "command": "python " + shlex.join(["benchmarks/bench_train.py", *(argv or sys.argv[1:])]),
        "settings": vars(args),
        "results": results,
    }
    if "per_sample" in results:
        report["speedup_batched_vs_per_sample"] = (
            results["batched"]["images_per_s"] / results["per_sample"]["images_per_s"]
        )
        print(f"batched / per-sample: {report['speedup_batched_vs_per_sample']:.2f}x")
    tag = "cpu" if device.type == "cpu" else _slug(device_name(device))
    out = Path(args.out) if args.out else RESULTS / f"bench_train_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


if __name__ == "__main__":
    main()
