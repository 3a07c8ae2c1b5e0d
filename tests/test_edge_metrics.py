"""PASCAL-Context metrics and losses (the fast dilation odsF, pooled saliency maxF/mIoU, parts
mIoU, binary BCE) against brute-force numpy implementations of the same definitions and
known-answer cases. The benchmark's own measures: ``test_benchmark_measures.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtpsl.metrics import (
    DilationEdgeMetric,
    PooledSaliencyMetric,
    SegmentationMetric,
    _disc_max,
    disc_offsets,
)
from mtpsl.tasks import build_task

BINS = 10


# ----------------------------------------------------------------------------- brute force


def _bins(p: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(p.astype(np.float64) * BINS), 0, BINS - 1).astype(int)


def _within(points: np.ndarray, others: np.ndarray, radius: float) -> np.ndarray:
    """For each point (row, col), is any of ``others`` within Euclidean ``radius``?"""
    if len(points) == 0 or len(others) == 0:
        return np.zeros(len(points), bool)
    d2 = ((points[:, None, :] - others[None, :, :]) ** 2).sum(-1)
    return (d2 <= radius * radius).any(1)


def brute_odsf(images: list[tuple[np.ndarray, np.ndarray]], max_dist: float) -> float:
    """odsF by explicit point-set distances: pooled P/R per threshold, max F."""
    best = 0.0
    for k in range(1, BINS):
        tp_p = n_p = tp_r = n_g = 0
        for pred, gt in images:
            h, w = gt.shape
            r = max_dist * math.hypot(h, w)
            valid = (gt == 0) | (gt == 1)
            pos = np.argwhere(valid & (_bins(pred) >= k))
            edges = np.argwhere(valid & (gt == 1))
            tp_p += int(_within(pos, edges, r).sum())
            n_p += len(pos)
            tp_r += int(_within(edges, pos, r).sum())
            n_g += len(edges)
        p = tp_p / n_p if n_p else 0.0
        rec = tp_r / n_g if n_g else 0.0
        if p + rec > 0:
            best = max(best, 2 * p * rec / (p + rec))
    return best


def brute_saliency(images: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(maxF with beta^2 = 0.3, max over thresholds of the 2-class mIoU), pooled counts."""
    pred = np.concatenate([p.ravel() for p, _ in images])
    gt = np.concatenate([g.ravel() for _, g in images])
    keep = (gt == 0) | (gt == 1)
    pred, gt = pred[keep], gt[keep] == 1
    best_f = best_iou = 0.0
    for k in range(1, BINS):
        yes = _bins(pred) >= k
        tp, fp = int((yes & gt).sum()), int((yes & ~gt).sum())
        fn, tn = int((~yes & gt).sum()), int((~yes & ~gt).sum())
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f = 1.3 * prec * rec / (0.3 * prec + rec) if prec + rec else 0.0
        best_f = max(best_f, f)
        best_iou = max(best_iou, (tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2)
    return best_f, best_iou


def _feed(metric, images):
    for pred, gt in images:
        metric.update(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None])
    return metric.compute()


def _random_edge_images(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((20, 30), (24, 24), (16, 40)):
        gt = (rng.random((h, w)) < 0.08).astype(np.float32)
        gt[rng.random((h, w)) < 0.1] = -1  # ignored pixels (padding)
        pred = np.clip(gt * 0.5 + rng.random((h, w)) * 0.6, 0, 1).astype(np.float32)
        images.append((pred, gt))
    return images


# ----------------------------------------------------------------------------- odsF


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_dist", [0.0, 0.05, 0.09])
def test_odsf_matches_brute_force(seed, max_dist):
    images = _random_edge_images(seed)
    got = _feed(DilationEdgeMetric(max_dist=max_dist, num_bins=BINS), images)["odsf_dilation"]
    assert got == pytest.approx(brute_odsf(images, max_dist), abs=1e-12)


def _line(h: int, w: int, row: int, cols: slice = slice(None)) -> np.ndarray:
    x = np.zeros((h, w), np.float32)
    x[row, cols] = 1.0
    return x


@pytest.mark.parametrize(
    ("pred_row", "cols", "expected"),
    [
        (20, slice(None), 1.0),  # perfect
        (21, slice(None), 1.0),  # shifted by 1 px: within the 3-px radius
        (23, slice(None), 1.0),  # shifted by 3 px: still within
        (24, slice(None), 0.0),  # shifted by 4 px: beyond the tolerance
        # half the edge missing: P = 1; R = (40 + 3) / 80 (the radius reaches 3 px further)
        (20, slice(0, 40), 2 * (43 / 80) / (1 + 43 / 80)),
    ],
)
def test_known_answers(pred_row, cols, expected):
    h, w = 60, 80  # diagonal 100 px: with max_dist 0.03 the radius is 3 px
    gt = _line(h, w, 20)
    pred = _line(h, w, pred_row, cols)
    metric = DilationEdgeMetric(max_dist=0.03)
    assert _feed(metric, [(pred, gt)])["odsf_dilation"] == pytest.approx(expected)


def test_default_tolerance_is_0_0075_of_the_diagonal():
    h, w = 300, 400  # diagonal 500 px -> radius 3.75 px
    gt = _line(h, w, 100)
    assert _feed(DilationEdgeMetric(), [(_line(h, w, 103), gt)])["odsf_dilation"] == 1.0
    assert _feed(DilationEdgeMetric(), [(_line(h, w, 104), gt)])["odsf_dilation"] == 0.0


def test_thick_prediction_is_not_thinned_documented_difference():
    """Every pixel of a 3-px band lies within the radius of the edge, so F = 1 (BSDS thins
    the band first, see test_benchmark_measures.py)."""
    h, w = 60, 80
    gt = _line(h, w, 20)
    pred = _line(h, w, 19) + _line(h, w, 20) + _line(h, w, 21)
    metric = DilationEdgeMetric(max_dist=0.03)
    assert _feed(metric, [(pred, gt)])["odsf_dilation"] == 1.0
    assert metric.best["precision"] == 1.0


def test_best_threshold_and_no_prediction():
    gt = _line(30, 40, 10)
    pred = gt * 0.55 + (1 - gt) * 0.45  # separable only above 0.45
    metric = DilationEdgeMetric(max_dist=0.0)
    assert _feed(metric, [(pred.astype(np.float32), gt)])["odsf_dilation"] == 1.0
    assert 0.45 <= metric.best["threshold"] <= 0.55  # any cut between the two values
    empty = DilationEdgeMetric()
    assert math.isnan(empty.compute()["odsf_dilation"])


def test_disc_offsets():
    assert disc_offsets(0.5) == [(0, 0)]
    assert len(disc_offsets(1.0)) == 5
    assert len(disc_offsets(math.sqrt(2))) == 9
    assert len(disc_offsets(2.0)) == 13


@pytest.mark.parametrize("radius", [0.0, 1.0, math.sqrt(2), 2.5, 3.6, 5.4, 7.3])
@pytest.mark.parametrize("pool", [False, True])
def test_disc_dilation_equals_max_over_every_offset(radius, pool):
    """Both fast dilations (CPU rows; max_pool2d rectangles, the default off CPU) equal the
    direct max over every disc offset, image borders skipped."""
    rng = np.random.default_rng(int(radius * 10))
    x = rng.integers(-1, 100, size=(2, 17, 23)).astype(np.float32)
    offsets = disc_offsets(radius)
    want = np.full_like(x, -np.inf)
    h, w = x.shape[1:]
    for dy, dx in offsets:
        ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
        yd, xd = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
        want[:, ys, xs] = np.maximum(want[:, ys, xs], x[:, yd, xd])
    got = _disc_max(torch.from_numpy(x), offsets, pool=pool)
    np.testing.assert_array_equal(got.numpy(), want)


# ----------------------------------------------------------------------------- saliency


@pytest.mark.parametrize("seed", [0, 1])
def test_saliency_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((12, 16), (9, 20)):
        gt = (rng.random((h, w)) < 0.4).astype(np.float32)
        gt[rng.random((h, w)) < 0.1] = -1
        pred = np.clip(0.4 * gt + 0.7 * rng.random((h, w)), 0, 1).astype(np.float32)
        images.append((pred, gt))
    got = _feed(PooledSaliencyMetric(num_bins=BINS), images)
    maxf, miou = brute_saliency(images)
    assert got["maxf_pooled"] == pytest.approx(maxf, abs=1e-12)
    assert got["miou_pooled"] == pytest.approx(miou, abs=1e-12)


def test_saliency_perfect_and_inverted():
    gt = np.zeros((10, 10), np.float32)
    gt[2:6, 3:8] = 1
    perfect = _feed(PooledSaliencyMetric(), [(gt * 0.9 + 0.05, gt)])
    assert perfect == {"maxf_pooled": 1.0, "miou_pooled": 1.0}
    inverted = _feed(PooledSaliencyMetric(), [(1 - gt, gt)])
    assert inverted["maxf_pooled"] == 0.0


# ----------------------------------------------------------------------------- parts mIoU


def test_parts_miou_matches_brute_force():
    rng = np.random.default_rng(3)
    gt = rng.integers(-1, 7, size=(4, 10, 12))
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 7, size=gt.shape))
    pred = np.clip(pred, 0, 6)
    metric = SegmentationMetric(num_classes=7)
    metric.update(torch.from_numpy(pred[:1]), torch.from_numpy(gt[:1]))
    metric.update(torch.from_numpy(pred[1:]), torch.from_numpy(gt[1:]))
    ious = []
    for c in range(7):
        valid = gt >= 0
        inter = ((pred == c) & (gt == c) & valid).sum()
        union = (((pred == c) | (gt == c)) & valid).sum()
        if union:
            ious.append(inter / union)
    assert metric.compute()["miou"] == pytest.approx(np.mean(ious), abs=1e-12)


# ----------------------------------------------------------------------------- losses


def test_edge_loss_is_the_weighted_bce_of_the_benchmark():
    task = build_task("edge", "edges")
    p = torch.tensor([[[[0.9, 0.2, 0.6, 0.3]]]])
    y = torch.tensor([[[[1.0, 0.0, -1.0, 1.0]]]])
    per_pixel = [-0.95 * math.log(0.9), -0.05 * math.log(0.8), -0.95 * math.log(0.3)]
    assert task.loss(p, y).item() == pytest.approx(sum(per_pixel) / 3, rel=1e-6)


def test_saliency_loss_is_plain_bce_and_loss_weight_scales():
    p, y = torch.rand(2, 1, 5, 6) * 0.98 + 0.01, (torch.rand(2, 1, 5, 6) > 0.5).float()
    task = build_task("saliency", "saliency")
    expected = F.binary_cross_entropy(p, y, reduction="none").flatten(1).mean(1)
    torch.testing.assert_close(task.loss(p, y), expected)
    weighted = build_task("saliency", "saliency", loss_weight=5.0)
    torch.testing.assert_close(weighted.loss(p, y), 5.0 * expected)
    blank = task.blank_like(y)
    assert not task.valid(blank).any() and (task.loss(p, blank) == 0).all()


def test_normal_l1_option_and_default_unchanged():
    pred = F.normalize(torch.randn(1, 3, 4, 4), dim=1)
    target = F.normalize(torch.randn(1, 3, 4, 4), dim=1)
    l1 = build_task("normal", "normal", loss_kind="l1").loss(pred, target)
    torch.testing.assert_close(l1, (pred - target).abs().sum(1).flatten(1).mean(1))
    cosine = build_task("normal", "normal").loss(pred, target)
    torch.testing.assert_close(cosine, (1 - (pred * target).sum(1)).flatten(1).mean(1))
