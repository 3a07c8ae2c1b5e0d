"""Time of the PASCAL-Context edge and saliency measures on a PASCAL-sized evaluation pass.

100 images of 500x375 (PASCAL's usual size) padded to 512x512, as mtpsl evaluates them, with
label edges from a random piecewise-constant label map and predictions that a network might
make: the edges blurred (sigma 1.5 px) plus smooth noise, so that at the low thresholds most of
the image is above threshold (the costly case for thinning). Prints seconds per image of the
BSDS edge measure (``edge``), the dilation approximation (``edge_dilation``) and the benchmark
saliency measure, and the ratios to the dilation one, measured in the same run; with
``--workers N`` also the BSDS measure scored in N worker processes.

    python benchmarks/bench_edge_eval.py --images 100 --workers 2 \
        --out benchmarks/results/edge_eval_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from mtpsl.metrics import DilationEdgeMetric, EdgeMetric, SaliencyMetric


def make_batch(rng: np.random.Generator, n: int, noise: float, h: int = 375, w: int = 500,
               size: int = 512) -> tuple[torch.Tensor, ...]:
    """``n`` (prediction, label) pairs of ``h x w`` padded to ``size`` with ignore labels."""
    preds, labels = torch.zeros(n, 1, size, size), torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        seg = ndimage.zoom(rng.integers(0, 6, (10, 13)), (h / 10, w / 13), order=0)[:h, :w]
        edge = (seg != np.roll(seg, 1, 0)) | (seg != np.roll(seg, 1, 1))
        prob = ndimage.gaussian_filter(edge.astype(float), 1.5) * 3
        prob += noise * ndimage.gaussian_filter(rng.random((h, w)), 3)
        preds[i, 0, :h, :w] = torch.from_numpy(np.clip(prob, 0, 1))
        labels[i, 0, :h, :w] = torch.from_numpy(edge.astype(np.float32))
    return preds, labels


def seconds_per_image(metric, preds: torch.Tensor, labels: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for k in range(0, len(preds), batch):
        metric.update(preds[k : k + batch], labels[k : k + batch])
    metric.compute()
    return (time.perf_counter() - start) / len(preds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs=2, default=[375, 500],
                        metavar=("H", "W"))
    parser.add_argument("--pad", type=int, default=512, help="padded size (square)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preds, labels = make_batch(np.random.default_rng(0), args.images, args.noise,
                               *args.image_size, args.pad)
    times = {
        "edge (BSDS, 99 thresholds)": seconds_per_image(EdgeMetric(), preds, labels, 8),
        "edge_dilation (100 bins)": seconds_per_image(DilationEdgeMetric(), preds, labels, 8),
        "saliency (benchmark, 15 thresholds)": seconds_per_image(
            SaliencyMetric(), preds, labels.clamp(min=-1), 8),
    }
    if args.workers:
        metric = EdgeMetric(workers=args.workers)
        metric.update(preds[:1], labels[:1])  # start the processes outside the timing
        metric.reset()
        times[f"edge (BSDS) in {args.workers} processes"] = seconds_per_image(
            metric, preds, labels, 8)
        metric.close()
    base = times["edge_dilation (100 bins)"]
    for name, sec in times.items():
        print(f"{name:38s} {sec:8.3f} s/image  x{sec / base:7.1f} of edge_dilation  "
              f"({sec * args.images:7.1f} s for {args.images} images)")
    result = {
        "command": "python " + shlex.join(["benchmarks/bench_edge_eval.py",
                                           *(sys.argv[1:] if argv is None else argv)]),
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": 1, "cpus": os.cpu_count(), "images": args.images,
        "image_size": f"{args.image_size[1]}x{args.image_size[0]} padded to {args.pad}x{args.pad}",
        "noise": args.noise,
        "seconds_per_image": times,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
