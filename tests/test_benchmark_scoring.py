"""PASCAL-Context scored exactly as the multi-task benchmark's evaluation code does (issue 29):
mIoU with an absent class counted 0 (``eval_semseg.py`` 60-75, ``eval_human_parts.py`` 58-73)
and the edge table SEISM writes for ``eval_edge.py`` (odsF, oisF, AP: ``pr_curves_base.m``
59-65, SEISM's ``gather_measure.m``, ``general_ods.m``, ``general_ois.m``, ``general_ap.m``),
each against a loop written from that code; and ``dataset.options.scoring=benchmark``
selecting both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import benchmark_reference as ref
from mtpsl.data.pascal import pascal_tasks
from mtpsl.metrics import EdgeMetric
from mtpsl.metrics.segmentation import SegmentationMetric
from mtpsl.tasks import build_task
from mtpsl.tasks.scoring import build_metrics

from conftest import padded_binary_batch


def _edge_images(seed: int):
    """Boundaries of random piecewise-constant label maps and blurred, noisy predictions,
    plus an image without edges."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((30, 40), (36, 28), (24, 44)):
        seg = ndimage.zoom(rng.integers(0, 5, (4, 5)), (h / 4, w / 5), order=0)[:h, :w]
        gt = (seg != np.roll(seg, 1, 0)) | (seg != np.roll(seg, 1, 1))
        prob = ndimage.gaussian_filter(gt.astype(float), 1.2) * 3 + 0.35 * rng.random((h, w))
        images.append((np.clip(prob, 0, 1).astype(np.float32), gt.astype(np.float32)))
    images.append((rng.random((20, 20)).astype(np.float32), np.zeros((20, 20), np.float32)))
    return images


# ----------------------------------------------------------------------------- mIoU


def _eval_semseg(preds: list[np.ndarray], gts: list[np.ndarray], n_classes: int) -> float:
    """eval_semseg.py 40-75: tp/fp/fn per class over pixels with gt != 255, Jaccard
    ``tp / max(tp + fp + fn, 1e-8)``, the plain mean over every class."""
    tp, fp, fn = [0] * n_classes, [0] * n_classes, [0] * n_classes
    for mask, gt in zip(preds, gts, strict=True):
        valid = gt != 255
        for i in range(n_classes):
            tmp_gt, tmp_pred = gt == i, mask == i
            tp[i] += np.sum(tmp_gt & tmp_pred & valid)
            fp[i] += np.sum(~tmp_gt & tmp_pred & valid)
            fn[i] += np.sum(tmp_gt & ~tmp_pred & valid)
    jac = [float(tp[i]) / max(float(tp[i] + fp[i] + fn[i]), 1e-8) for i in range(n_classes)]
    return float(np.mean(jac))


def test_absent_class_zero_equals_the_benchmarks_miou():
    rng = np.random.default_rng(0)
    c = 6
    gts = [rng.integers(0, c - 1, (9, 11)) for _ in range(3)]  # class 5 never labelled ...
    preds = [rng.integers(0, c - 2, (9, 11)) for _ in range(3)]  # ... nor predicted (nor 4)
    for g in gts:
        g[:2] = 255
    zero, skip = SegmentationMetric(c, absent_class="zero"), SegmentationMetric(c)
    for p, g in zip(preds, gts, strict=True):
        target = torch.from_numpy(np.where(g == 255, -1, g))[None]
        for metric in (zero, skip):
            metric.update(torch.from_numpy(p)[None], target)
    got, default = zero.compute(), skip.compute()
    assert got["miou"] == pytest.approx(_eval_semseg(preds, gts, c), abs=1e-12)
    assert default["miou"] == pytest.approx(got["miou"] * c / (c - 1), abs=1e-12)
    assert zero.per_class_iou[5] == 0.0 and np.isnan(skip.per_class_iou[5])
    with pytest.raises(ValueError, match="absent_class"):
        SegmentationMetric(c, absent_class="nan")


# ----------------------------------------------------------------------------- edges


def _seism(per_image: list[np.ndarray]) -> dict:
    """The SEISM chain for ``fb`` from per-image ``[T, 4]`` counts (cntR, sumR, cntP, sumP)."""
    def rates(c):  # gather_measure.m 72-81 (eval_cont.m 63-80 per image)
        r, p = np.zeros(len(c)), np.zeros(len(c))
        for t, (cnt_r, sum_r, cnt_p, sum_p) in enumerate(c):
            if sum_r == 0 and cnt_p == 0:
                r[t], p[t] = 1.0, 0.0
            if sum_p == 0 and cnt_r == 0:
                r[t], p[t] = 0.0, 1.0
            if sum_p != 0 and cnt_r != 0:
                r[t], p[t] = cnt_r / sum_r, cnt_p / sum_p
        return r, p

    def fmeasure(r, p):
        return np.array([0.0 if a + b == 0 else 2 * a * b / (a + b) for a, b in zip(r, p,
                                                                                   strict=True)])

    total = sum(per_image)
    r, p = rates(total)
    ods = float(fmeasure(r, p).max())  # general_ods.m 11: the max over thresholds
    at_best = np.zeros(4)
    for c in per_image:  # general_ois.m 11-48, F per image as written with %f
        f = np.array([float(f"{v:f}") for v in fmeasure(*rates(c))])
        at_best += c[int(np.argmax(f))]
    ois = float(fmeasure(*rates(at_best[None]))[0])
    # general_ap.m: unique recall (first occurrence), precision interpolated at 0:.01:1,
    # NaN outside the recall range dropped, the sum divided by 100
    order = sorted({v: t for t, v in reversed(list(enumerate(r)))}.items())
    xs, ys = [v for v, _ in order], [p[t] for _, t in order]
    ap = 0.0
    if len(xs) > 1:
        for q in np.arange(101) / 100:
            for k in range(len(xs) - 1):
                if xs[k] <= q <= xs[k + 1]:
                    ap += ys[k] + (ys[k + 1] - ys[k]) * (q - xs[k]) / (xs[k + 1] - xs[k])
                    break
        ap /= 100
    return {"odsf": ods, "oisf": ois, "ap": ap}


@pytest.mark.parametrize("seed", [0, 1])
def test_edge_seism_protocol_equals_the_benchmarks_table(seed):
    pytest.importorskip("skimage")
    images = _edge_images(seed)
    n = 9
    seism, bsds = EdgeMetric(max_dist=0.04, num_thresholds=n, protocol="seism"), \
        EdgeMetric(max_dist=0.04, num_thresholds=n)
    for chunk in (images[:2], images[2:]):
        for metric in (seism, bsds):
            metric.update(*padded_binary_batch(chunk, (40, 48)))
    thresholds = np.arange(1, n + 1) / (n + 1)
    per_image = [ref.image_counts(p, g.astype(bool), thresholds, 0.04) for p, g in images]
    want = _seism(per_image)
    got = seism.compute()
    for key in ("odsf", "oisf", "ap"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    default = bsds.compute()
    assert default["ap"] == got["ap"]  # AP is SEISM's under either protocol
    assert default["odsf"] >= got["odsf"]  # the interpolation can only add


def test_edge_ap_known_answers():
    """A perfect map: recall 1 with precision 1 up to its value, then nothing predicted,
    which SEISM scores (recall 0, precision 1): 101 grid points of 1 over 100 = 1.01."""
    h, w = 30, 40
    gt = np.zeros((h, w), np.float32)
    gt[10, 5:-5] = 1
    metric = EdgeMetric(max_dist=0.03, protocol="seism")
    metric.update(*padded_binary_batch([(0.6 * gt, gt)], (h, w)))
    assert metric.compute() == pytest.approx({"odsf": 1.0, "oisf": 1.0, "ap": 1.01})
    empty = EdgeMetric(max_dist=0.03)
    empty.update(*padded_binary_batch([(np.zeros((h, w), np.float32), gt)], (h, w)))
    assert empty.compute()["ap"] == 0.0  # one recall value (0) only
    with pytest.raises(ValueError, match="protocol"):
        EdgeMetric(protocol="ods")


# ----------------------------------------------------------------------------- options


def test_dataset_scoring_benchmark_selects_both_rules():
    tasks = pascal_tasks(["semantic", "parts", "edges"], scoring="benchmark")
    metrics = build_metrics(tasks)
    assert metrics["semantic"].absent_class == metrics["parts"].absent_class == "zero"
    assert metrics["edges"].protocol == "seism"
    default = build_metrics(pascal_tasks(["semantic", "edges"]))
    assert default["semantic"].absent_class == "skip" and default["edges"].protocol == "bsds"
    with pytest.raises(ValueError, match="scoring"):
        pascal_tasks(["semantic"], scoring="paper")
    for kind, key in (("segmentation", "absent_class"), ("edge", "protocol")):
        with pytest.raises(ValueError, match=key):
            build_task(kind, "x", **{key: "nope"})
