"""Evaluation metric accumulation: streaming device-side metrics vs a naive host version.

Predictions and labels already sit on the device (as after a model's forward pass). The
streaming path is ``mtpsl.evaluate.accumulate`` (``mtpsl.metrics``: confusion matrix, error sums and
an angle histogram updated on the device, one host copy at the end). The naive path copies
every batch to the host (``.cpu().numpy()``) and accumulates there with numpy, keeping all
normal angles for an exact median, as reference evaluation scripts do. Both see the same
batches; their results are compared (the streaming median is a 1e-3 degree histogram bin).

    python benchmarks/bench_eval.py --device cuda --batches 50 --batch-size 32
    python benchmarks/bench_eval.py --device cpu --height 72 --width 96
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtpsl.evaluate import accumulate, build_metrics
from mtpsl.tasks import build_task

RESULTS = Path(__file__).parent / "results"
CLASSES = 13


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="distinct batches per pass")
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is kept")
    p.add_argument("--out", help="JSON path (default results/bench_eval_<device>.json)")
    return p.parse_args(argv)


def make_batches(args, device) -> list[dict]:
    """Model-like outputs and labels with invalid pixels, resident on the device."""
    g = torch.Generator().manual_seed(0)
    out = []
    b, h, w = args.batch_size, args.height, args.width
    for _ in range(args.batches):
        sem = torch.randint(-1, CLASSES, (b, h, w), generator=g)
        depth = torch.rand(b, 1, h, w, generator=g) * 10
        depth = depth * (torch.rand(b, 1, h, w, generator=g) > 0.1)
        normal = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        normal = normal * (torch.rand(b, 1, h, w, generator=g) > 0.1)
        preds = {
            "semantic": torch.randn(b, CLASSES, h, w, generator=g).log_softmax(1),
            "depth": torch.rand(b, 1, h, w, generator=g) * 10,
            "normal": F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1),
        }
        targets = {"semantic": sem, "depth": depth, "normal": normal}
        out.append(
            {
                k: {t: v.to(device) for t, v in d.items()}
                for k, d in (("preds", preds), ("targets", targets))
            }
        )
    return out


def streaming(batches: list[dict], tasks: dict) -> dict[str, float]:
    metrics = build_metrics(tasks)
    for batch in batches:
        accumulate(metrics, batch["preds"], batch["targets"])
    return {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.compute().items()}


def naive(batches: list[dict]) -> dict[str, float]:
    """Per-batch host copies and numpy accumulation of the same statistics."""
    conf = np.zeros((CLASSES, CLASSES), np.int64)
    depth = np.zeros(7)  # count, abs, rel, sq, within 1.25 ** (1, 2, 3)
    angles = []
    for batch in batches:
        p = {k: v.cpu().numpy() for k, v in batch["preds"].items()}
        t = {k: v.cpu().numpy() for k, v in batch["targets"].items()}
        cls, gt = p["semantic"].argmax(1), t["semantic"]
        ok = (gt >= 0) & (gt < CLASSES)
        conf += np.bincount(gt[ok] * CLASSES + cls[ok], minlength=CLASSES**2).reshape(
            CLASSES, CLASSES
        )
        valid = t["depth"] != 0
        pd, gd = p["depth"][valid], t["depth"][valid]
        err = pd - gd
        ratio = np.maximum(pd / gd, gd / pd)
        depth += [
            valid.sum(),
            np.abs(err).sum(),
            (np.abs(err) / gd).sum(),
            (err**2).sum(),
            *((ratio < 1.25**k).sum() for k in (1, 2, 3)),
        ]
        nv = (t["normal"] != 0).any(1)
        pn = p["normal"] / np.linalg.norm(p["normal"], axis=1, keepdims=True)
        dot = np.clip((pn * t["normal"]).sum(1)[nv], -1, 1)
        angles.append(np.degrees(np.arccos(dot)))
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    angle = np.concatenate(angles)
    n = depth[0]
    out = {
        "semantic/miou": float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))),
        "semantic/pixel_acc": float(tp.sum() / conf.sum()),
        "depth/abs_err": depth[1] / n,
        "depth/rel_err": depth[2] / n,
        "depth/rmse": float(np.sqrt(depth[3] / n)),
        "normal/mean": float(angle.mean()),
        "normal/median": float(np.median(angle)),
        "normal/rmse": float(np.sqrt((angle**2).mean())),
    }
    out.update({f"depth/delta{k}": depth[3 + k] / n * 100 for k in (1, 2, 3)})
    out.update(
        {
            f"normal/within_{str(th).replace('.', '_')}": float((angle < th).mean() * 100)
            for th in (11.25, 22.5, 30)
        }
    )
    return out


def timed(fn, batches, repeats: int, device) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn(batches)  # both end with their results on the host
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    tasks = {
        "semantic": build_task("segmentation", "semantic", num_classes=CLASSES),
        "depth": build_task("depth", "depth"),
        "normal": build_task("normal", "normal"),
    }
    batches = make_batches(args, device)
    n_images = args.batches * args.batch_size
    t_stream, r_stream = timed(lambda b: streaming(b, tasks), batches, args.repeats, device)
    t_naive, r_naive = timed(naive, batches, args.repeats, device)
    gap = {k: abs(r_stream[k] - v) for k, v in r_naive.items()}
    report = {
        "benchmark": "bench_eval",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python " + shlex.join(["benchmarks/bench_eval.py", *(argv or sys.argv[1:])]),
        "settings": vars(args),
        "images": n_images,
        "streaming_images_per_s": n_images / t_stream,
        "naive_host_images_per_s": n_images / t_naive,
        "speedup": t_naive / t_stream,
        "max_abs_metric_gap": max(gap.values()),
        "metrics": r_stream,
    }
    print(f"streaming (device): {report['streaming_images_per_s']:10.1f} img/s")
    print(f"naive (host numpy): {report['naive_host_images_per_s']:10.1f} img/s")
    print(
        f"speedup {report['speedup']:.2f}x; largest metric gap {report['max_abs_metric_gap']:.2e}"
    )
    tag = (
        "cpu"
        if device.type == "cpu"
        else "".join(c if c.isalnum() else "_" for c in report["device"].lower())
    )
    out = Path(args.out) if args.out else RESULTS / f"bench_eval_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
