"""Evaluation metric accumulation: streaming device-side metrics vs a naive host version.

Predictions and labels already sit on the device (as after a model's forward pass). The
streaming path is ``mtpsl.engine.evaluate.accumulate`` (``mtpsl.metrics``: confusion matrices, error
sums, angle histograms, per-image saliency rates and odsF's disc dilations updated on the
device, one host copy at the end). The naive path copies every batch to the host
(``.cpu().numpy()``) and accumulates there with numpy, keeping all normal angles for an exact
median and dilating edge maps by a loop over the disc's pixel offsets, as reference evaluation
scripts do. Both see the
same batches, timed alternately (best of ``--repeats``); their results are compared (the
streaming normal median is a 1e-3 degree histogram bin).

``--dataset nyuv2``: semantic (13 classes), depth, normal. ``--dataset pascal``: the five
PASCAL-Context tasks (semantic 21 classes, parts 7, normal, saliency maxF/mIoU, edges by the
on-device dilation measure ``odsf_dilation``: the published BSDS measure runs on the host by
design and is timed by ``bench_edge_eval.py``).

    python benchmarks/bench_eval.py --device cuda --batches 50 --batch-size 32
    python benchmarks/bench_eval.py --device cpu --height 96 --width 128 --batch-size 8
    python benchmarks/bench_eval.py --device cuda --dataset pascal --height 512 --width 512
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mtpsl.data.pascal import PASCAL_TASKS, pascal_tasks
from mtpsl.engine.evaluate import accumulate
from mtpsl.metrics import NORMAL_THRESHOLDS_DEG, disc_offsets
from mtpsl.tasks import Task, build_task
from mtpsl.tasks.scoring import build_metrics

RESULTS = Path(__file__).parent / "results"
NYU_CLASSES = 13
BINS = 100  # threshold grid of the dilation edge metric (its default)
SALIENCY_THRESHOLDS = np.linspace(0.2, 0.9, 15).astype(np.float32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset", choices=("nyuv2", "pascal"), default="nyuv2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="distinct batches per pass")
    p.add_argument("--height", type=int, default=288)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is kept")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", help="JSON path (default results/bench_eval[_pascal]_<device>.json)")
    return p.parse_args(argv)


def bench_tasks(dataset: str) -> dict[str, Task]:
    if dataset == "pascal":
        return pascal_tasks(PASCAL_TASKS, edge_measure="dilation")
    return {
        "semantic": build_task("segmentation", "semantic", num_classes=NYU_CLASSES),
        "depth": build_task("depth", "depth"),
        "normal": build_task("normal", "normal"),
    }


def _fake_pair(task: Task, b: int, h: int, w: int, g: torch.Generator):
    """A model-like prediction and a label with unlabelled pixels for one task."""
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    if task.metric == "segmentation":
        c = task.num_classes
        target = torch.randint(0, c, (b, h, w), generator=g)
        target[rand(b, h, w) < 0.1] = 255 if c > NYU_CLASSES else -1
        return torch.randn(b, c, h, w, generator=g).log_softmax(1), target
    if task.metric == "depth":
        target = rand(b, 1, h, w) * 10 * (rand(b, 1, h, w) > 0.1)
        return rand(b, 1, h, w) * 10, target
    if task.metric == "normal":
        target = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        target = target * (rand(b, 1, h, w) > 0.1)
        return F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1), target
    if task.metric in ("saliency", "edge"):
        share = 0.3 if task.metric == "saliency" else 0.05
        target = (rand(b, 1, h, w) < share).float()
        target[:, :, -h // 10 :] = -1  # padding rows, ignored
        return (0.5 * target.clamp_min(0) + 0.6 * rand(b, 1, h, w)).clamp(0, 1), target
    raise ValueError(f"no fake data for metric {task.metric!r}")


def make_batches(args: argparse.Namespace, tasks: Mapping[str, Task], device) -> list[dict]:
    """Model-like outputs and labels with invalid pixels, resident on the device."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.batches):
        pairs = {n: _fake_pair(t, args.batch_size, args.height, args.width, g)
                 for n, t in tasks.items()}
        out.append({role: {n: pair[i].to(device) for n, pair in pairs.items()}
                    for i, role in enumerate(("preds", "targets"))})
    return out


def streaming(batches: list[dict], tasks: Mapping[str, Task]) -> dict[str, float]:
    metrics = build_metrics(tasks)
    for batch in batches:
        accumulate(metrics, batch["preds"], batch["targets"])
    return {f"{n}/{k}": v for n, m in metrics.items() for k, v in m.compute().items()}


# ------------------------------------------------------------------- naive host numpy


class NaiveSegmentation:
    def __init__(self, task: Task) -> None:
        self.c = task.num_classes
        self.conf = np.zeros((self.c, self.c), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        cls = pred.argmax(1)
        ok = (gt >= 0) & (gt < self.c)
        self.conf += np.bincount(gt[ok] * self.c + cls[ok], minlength=self.c**2).reshape(
            self.c, self.c
        )

    def result(self) -> dict[str, float]:
        tp = np.diag(self.conf).astype(np.float64)
        union = self.conf.sum(0) + self.conf.sum(1) - tp
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        return {"miou": float(np.nanmean(iou)), "pixel_acc": float(tp.sum() / self.conf.sum())}


class NaiveDepth:
    def __init__(self, task: Task) -> None:
        self.acc = np.zeros(7)  # count, abs, rel, sq, within 1.25 ** (1, 2, 3)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = gt != 0
        p, g = pred[valid], gt[valid]
        err = p - g
        ratio = np.maximum(p / g, g / p)
        self.acc += [valid.sum(), np.abs(err).sum(), (np.abs(err) / g).sum(), (err**2).sum(),
                     *((ratio < 1.25**k).sum() for k in (1, 2, 3))]

    def result(self) -> dict[str, float]:
        n = self.acc[0]
        out = {"abs_err": self.acc[1] / n, "rel_err": self.acc[2] / n,
               "rmse": float(np.sqrt(self.acc[3] / n))}
        out.update({f"delta{k}": self.acc[3 + k] / n * 100 for k in (1, 2, 3)})
        return out


class NaiveNormal:
    def __init__(self, task: Task) -> None:
        self.angles: list[np.ndarray] = []

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        valid = (gt != 0).any(1)
        unit = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)
        dot = np.clip((unit * gt).sum(1)[valid], -1, 1)
        self.angles.append(np.degrees(np.arccos(dot)))

    def result(self) -> dict[str, float]:
        a = np.concatenate(self.angles).astype(np.float64)
        out = {"mean": float(a.mean()), "median": float(np.median(a)),
               "rmse": float(np.sqrt((a**2).mean()))}
        keys = ("within_11_25", "within_22_5", "within_30")
        out.update({k: float((a < th).mean() * 100)
                    for k, th in zip(keys, NORMAL_THRESHOLDS_DEG, strict=True)})
        return out


def _prob_bins(p: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(p.astype(np.float64) * BINS), 0, BINS - 1).astype(np.int64)


def _at_or_above(hist: np.ndarray) -> np.ndarray:
    """Counts at thresholds k = 1..BINS-1 (bin >= k)."""
    return np.cumsum(hist[::-1])[::-1][1:].astype(np.float64)


class NaiveSaliency:
    """The benchmark's per-image precision, recall and Jaccard at 15 thresholds, averaged."""

    def __init__(self, task: Task) -> None:
        self.sums, self.images = np.zeros((3, len(SALIENCY_THRESHOLDS))), 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        for p, g in zip(pred[:, 0], gt[:, 0], strict=True):
            valid, salient = (g == 0) | (g == 1), g == 1
            level = np.floor(p.astype(np.float32) * 255) / np.float32(255)
            for j, t in enumerate(SALIENCY_THRESHOLDS):
                above = (level > t) & valid
                tp, fp = (above & salient).sum(), (above & ~salient).sum()
                fn = (~above & salient).sum()
                self.sums[:, j] += [tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12),
                                    tp / (tp + fp + fn) if tp + fp + fn else 1.0]
            self.images += 1

    def result(self) -> dict[str, float]:
        prec, rec, jac = self.sums / self.images
        return {"maxf": float((2 * prec * rec / (prec + rec + 1e-12)).max()),
                "miou": float(jac.max())}


class NaiveEdge:
    """odsF with a many-to-many disc tolerance: dilation by shifted copies per disc offset."""

    def __init__(self, task: Task) -> None:
        self.max_dist = task.max_dist
        self.pred_all, self.pred_near = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64)
        self.gt_best = np.zeros(BINS + 1, np.int64)

    @staticmethod
    def _dilate(x: np.ndarray, offsets: list[tuple[int, int]], fill: float) -> np.ndarray:
        r = max(abs(dy) for dy, _ in offsets)
        h, w = x.shape[-2:]
        padded = np.pad(x, ((0, 0), (r, r), (r, r)), constant_values=fill)
        out = np.full_like(x, fill)
        for dy, dx in offsets:
            np.maximum(out, padded[:, r + dy : r + dy + h, r + dx : r + dx + w], out=out)
        return out

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p, g = pred[:, 0], gt[:, 0]
        offsets = disc_offsets(self.max_dist * math.hypot(*g.shape[-2:]))
        valid, edge = (g == 0) | (g == 1), g == 1
        bins = _prob_bins(p)
        near = self._dilate(edge.astype(np.int8), offsets, 0) > 0
        best = self._dilate(np.where(valid, bins, -1), offsets, -1) + 1
        self.pred_all += np.bincount(bins[valid], minlength=BINS)
        self.pred_near += np.bincount(bins[valid & near], minlength=BINS)
        self.gt_best += np.bincount(best[edge], minlength=BINS + 1)

    def result(self) -> dict[str, float]:
        positives, hits = _at_or_above(self.pred_all), _at_or_above(self.pred_near)
        found = np.cumsum(self.gt_best[::-1])[::-1][2:].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(positives > 0, hits / positives, 0.0)
            rec = found / self.gt_best.sum()
            f = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
        return {"odsf_dilation": float(f.max())}


NAIVE = {"segmentation": NaiveSegmentation, "depth": NaiveDepth, "normal": NaiveNormal,
         "saliency": NaiveSaliency, "edge_dilation": NaiveEdge}


def naive(batches: list[dict], tasks: Mapping[str, Task]) -> dict[str, float]:
    """Per-batch host copies and numpy accumulation of the same statistics."""
    accs = {n: NAIVE[t.metric_name()](t) for n, t in tasks.items()}
    for batch in batches:
        for name, acc in accs.items():
            acc.update(batch["preds"][name].cpu().numpy(), batch["targets"][name].cpu().numpy())
    return {f"{n}/{k}": v for n, acc in accs.items() for k, v in acc.result().items()}


# ----------------------------------------------------------------------------- timing


def timed(fns: dict[str, Callable], repeats: int, device) -> tuple[dict, dict]:
    """Best wall time of each function, the functions taking turns so they share the load."""
    best = dict.fromkeys(fns, math.inf)
    results: dict = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = fn()  # both end with their results on the host
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = bench_tasks(args.dataset)
    batches = make_batches(args, tasks, device)
    n_images = args.batches * args.batch_size
    times, results = timed(
        {"streaming": lambda: streaming(batches, tasks), "naive": lambda: naive(batches, tasks)},
        args.repeats, device,
    )
    r_stream = results["streaming"]
    gap = {k: abs(r_stream[k] - v) for k, v in results["naive"].items()}
    worst = max(gap, key=gap.get)
    report = {
        "benchmark": "bench_eval",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python " + shlex.join(["benchmarks/bench_eval.py", *(argv or sys.argv[1:])]),
        "settings": vars(args),
        "torch_threads": torch.get_num_threads(),
        "images": n_images,
        "streaming_images_per_s": n_images / times["streaming"],
        "naive_host_images_per_s": n_images / times["naive"],
        "speedup": times["naive"] / times["streaming"],
        "max_abs_metric_gap": gap[worst],
        "max_gap_metric": worst,
        "metrics": r_stream,
    }
    print(f"streaming (device): {report['streaming_images_per_s']:10.1f} img/s")
    print(f"naive (host numpy): {report['naive_host_images_per_s']:10.1f} img/s")
    print(f"speedup {report['speedup']:.2f}x; largest metric gap {gap[worst]:.2e} ({worst})")
    tag = (
        "cpu"
        if device.type == "cpu"
        else "".join(c if c.isalnum() else "_" for c in report["device"].lower())
    )
    prefix = "bench_eval_pascal" if args.dataset == "pascal" else "bench_eval"
    out = Path(args.out) if args.out else RESULTS / f"{prefix}_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
