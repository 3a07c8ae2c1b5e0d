"""Saliency and edge measures of the multi-task PASCAL-Context benchmark (issue 18): against the
re-implementations of its formulas in ``benchmark_reference.py``, the BSDS C++ matcher (through
pyEdgeEval, when installed), scikit-image's thinning, and cases with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import benchmark_reference as ref
from mtpsl.metrics import EdgeMetric, SaliencyMetric
from mtpsl.metrics.bsds import match_counts, thin

from conftest import load_benchmark, padded_binary_batch


def _saliency_images(seed: int):
    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((18, 23), (20, 20), (15, 26), (19, 21)):
        gt = (ndimage.gaussian_filter(rng.random((h, w)), 2) > 0.5).astype(np.float32)
        prob = np.clip(0.5 * gt + 0.6 * rng.random((h, w)), 0, 1).astype(np.float32)
        images.append((prob, gt))
    images.append((np.full((12, 14), 0.1, np.float32), np.zeros((12, 14), np.float32)))  # empty
    images.append((rng.random((12, 14)).astype(np.float32), np.zeros((12, 14), np.float32)))
    return images


# ----------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [255, None])
def test_saliency_equals_the_benchmark_formulas(seed, levels):
    """Per-image P/R/Jaccard averaged, 15 thresholds, ``p > t``, F with beta 1, padding cropped;
    images with nothing salient included (Jaccard 1 where the prediction is empty too)."""
    images = _saliency_images(seed)
    metric = SaliencyMetric(levels=levels)
    for chunk in (images[:3], images[3:]):  # two batches, padded to one size
        metric.update(*padded_binary_batch(chunk, (21, 27), 0.97))
    want = ref.eval_sal(images, quantise=levels is not None)
    got = metric.compute()
    assert got["maxf"] == pytest.approx(want["maxf"], abs=1e-12)
    assert got["miou"] == pytest.approx(want["miou"], abs=1e-7)  # the benchmark's float32 division


def test_saliency_known_answers():
    gt = np.zeros((10, 10), np.float32)
    gt[2:6, 3:8] = 1
    perfect = SaliencyMetric()
    perfect.update(*padded_binary_batch([(gt * 0.9 + 0.05, gt)], (10, 10), 0.97))
    assert perfect.compute() == pytest.approx({"maxf": 1.0, "miou": 1.0}, abs=1e-9)
    # nothing salient and nothing predicted: Jaccard 1, precision and recall 0 (the benchmark's)
    empty = SaliencyMetric()
    empty.update(*padded_binary_batch([(np.zeros((8, 8), np.float32),
                                         np.zeros((8, 8), np.float32))], (8, 8), 0.97))
    assert empty.compute() == {"maxf": 0.0, "miou": 1.0}
    # 0.2 quantises to 51/255, not above the first threshold (strict >)
    at = SaliencyMetric()
    at.update(*padded_binary_batch([(np.full((4, 4), 0.2 + 1e-4, np.float32),
                                     np.ones((4, 4), np.float32))], (4, 4), 0.97))
    assert at.compute()["miou"] == 0.0
    assert math.isnan(SaliencyMetric().compute()["maxf"])


# ----------------------------------------------------------------------------- thinning
def _blobs(rng, h, w):
    field = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3))
    return field > np.quantile(field, rng.uniform(0.2, 0.9))


def test_thinning_equals_scikit_image():
    skimage_morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(4, 40, 2)
        masks = np.stack([_blobs(rng, h, w) for _ in range(3)])
        masks[0, :, :2] = True  # shapes touching the border
        np.testing.assert_array_equal(
            thin(masks), np.stack([skimage_morphology.thin(m) for m in masks]))


def test_thinning_reduces_a_thick_band_to_its_middle_line():
    band = np.zeros((1, 12, 30), bool)
    band[0, 4:7, 2:28] = True
    out = thin(band)[0]
    assert out.sum() <= 28 and out[5, 3:27].all() and not out[4].any() and not out[6].any()


# ----------------------------------------------------------------------------- matching
def _lines(rng, h, w, n):
    """Edge-like maps: boundaries of a random piecewise-constant label map."""
    seg = ndimage.zoom(rng.integers(0, n, (4, 5)), (h / 4, w / 5), order=0)[:h, :w]
    return (seg != np.roll(seg, 1, 0)) | (seg != np.roll(seg, 1, 1))


def test_matching_is_a_maximum_matching():
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = rng.integers(6, 40, 2)
        preds = rng.random((3, h, w)) < rng.uniform(0.02, 0.4)
        gt = rng.random((h, w)) < rng.uniform(0.02, 0.4)
        radius = rng.uniform(0.5, 4.0)
        got = match_counts(preds, gt, radius)
        assert got.tolist() == [ref.max_matching(p, gt, radius) for p in preds]


def test_matching_against_the_bsds_code():
    """BSDS's ``correspondPixels`` (a min-cost assignment over randomly sampled outlier edges)
    is randomised: run to run it finds the maximum matching or falls a few pairs short of it
    (about 0.3% of the matches on edge maps). Ours is the maximum: never below BSDS, equal to
    the best of repeated BSDS runs up to those few pairs."""
    pyedgeeval = pytest.importorskip("pyEdgeEval")
    rng = np.random.default_rng(2)
    total_ours = total_bsds = 0
    for k in range(60):
        h, w = rng.integers(10, 60, 2)
        max_dist = rng.uniform(0.01, 0.08)
        if k % 2:
            pred, gt = _lines(rng, h, w, 4), _lines(rng, h, w, 4)
        else:
            pred, gt = (rng.random((h, w)) < rng.uniform(0.02, 0.3) for _ in range(2))
        runs = []
        for _ in range(3):
            m1, m2, _, _ = pyedgeeval.correspond_pixels(pred.astype(float), gt.astype(float),
                                                        max_dist=max_dist)
            runs.append(int((m1 > 0).sum()))
            assert runs[-1] == int((m2 > 0).sum())
        ours = int(match_counts(pred[None], gt, max_dist * math.hypot(h, w))[0])
        assert max(runs) <= ours <= max(runs) + max(3, 0.02 * ours)
        total_ours, total_bsds = total_ours + ours, total_bsds + runs[0]
    assert total_bsds <= total_ours <= 1.01 * total_bsds


# ----------------------------------------------------------------------------- odsF / oisF
def _edge_images(seed: int):
    rng = np.random.default_rng(seed)
    images = []
    for h, w in ((30, 40), (36, 28), (24, 44)):
        gt = _lines(rng, h, w, 5)
        prob = ndimage.gaussian_filter(gt.astype(float), 1.2) * 3 + 0.35 * rng.random((h, w))
        images.append((np.clip(prob, 0, 1).astype(np.float32), gt.astype(np.float32)))
    images.append((rng.random((20, 20)).astype(np.float32), np.zeros((20, 20), np.float32)))
    return images


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("levels", "n"), [(255, 9), (None, 5)])
def test_edge_equals_the_bsds_definition(seed, levels, n):
    """ODS and OIS over thinned, one-to-one matched maps at each image's own size (the padding
    cropped away, so the radius is the image's diagonal), against the per-image reference."""
    pytest.importorskip("skimage")
    images = _edge_images(seed)
    metric = EdgeMetric(max_dist=0.04, num_thresholds=n, levels=levels)
    for chunk in (images[:2], images[2:]):
        metric.update(*padded_binary_batch(chunk, (40, 48), 0.97))
    thresholds = np.arange(1, n + 1) / (n + 1)
    want = ref.collect([ref.image_counts(p, g.astype(bool), thresholds, 0.04, levels is not None)
                        for p, g in images], thresholds)
    got = metric.compute()
    assert got["odsf"] == pytest.approx(want["odsf"], abs=1e-12)
    assert got["oisf"] == pytest.approx(want["oisf"], abs=1e-12)


def test_edge_worker_processes_give_the_same_counts():
    images = _edge_images(3)
    serial, parallel = EdgeMetric(max_dist=0.04), EdgeMetric(max_dist=0.04, workers=2)
    try:
        for chunk in (images[:2], images[2:]):
            for metric in (serial, parallel):
                metric.update(*padded_binary_batch(chunk, (40, 48), 0.97))
        for a, b in zip(parallel.state_tensors(), serial.state_tensors(), strict=True):
            assert torch.equal(a, b)  # state_tensors waits for the workers (DDP reduces them)
        assert parallel.compute() == serial.compute()
    finally:
        parallel.close()


def _line(h, w, row, value=1.0):
    x = np.zeros((h, w), np.float32)
    x[row, 5:-5] = value
    return x


def _score(pred, gt, **kw):
    metric = EdgeMetric(**kw)
    metric.update(*padded_binary_batch([(pred, gt)], gt.shape, 0.97))
    return metric.compute()


def test_edge_known_answers():
    h, w = 60, 80  # diagonal 100 px: max_dist 0.03 is a 3-px radius
    gt = _line(h, w, 20)
    assert _score(0.9 * _line(h, w, 23), gt, max_dist=0.03)["odsf"] == 1.0
    assert _score(0.9 * _line(h, w, 24), gt, max_dist=0.03)["odsf"] == 0.0
    # a 5-px-thick correct edge thins to its middle line, a little shorter at the ends: every
    # thinned pixel is matched, F = 2 m / (n_pred + n_gt) (the dilation measure: 0.75)
    thick = sum(_line(h, w, r) for r in range(18, 23)) * 0.9
    thinned = thin(thick[None] > 0)[0]
    assert thinned[20, 8:-8].all() and thinned.sum() == thinned[20].sum() > 60
    assert _score(thick, gt, max_dist=0.03)["odsf"] == pytest.approx(
        2 * thinned.sum() / (thinned.sum() + gt.sum()))
    # one predicted line between two labelled ones: each predicted pixel explains one label
    # pixel, R = 1/2, F = 2/3 (the dilation measure: 1)
    two = gt + _line(h, w, 22)
    assert _score(0.9 * _line(h, w, 21), two, max_dist=0.03)["odsf"] == pytest.approx(2 / 3)


def test_edge_radius_is_the_diagonal_of_the_image_not_of_the_padding():
    h, w = 30, 40  # diagonal 50 px: 0.0075 -> 0.375 px, a 1-px shift is not matched
    gt, shifted = _line(h, w, 10), 0.9 * _line(h, w, 11)
    metric = EdgeMetric()
    # padded diagonal 500 px -> 3.75 px
    metric.update(*padded_binary_batch([(shifted, gt)], (300, 400), 0.97))
    assert metric.compute()["odsf"] == 0.0


def test_edge_best_map_is_the_thinned_map_at_the_best_threshold():
    h, w = 30, 40
    gt = _line(h, w, 10)
    prob = np.full((h, w), 0.3, np.float32)
    prob[9:12, 5:-5] = 0.8  # a 3-px band over the edge
    pred, target = padded_binary_batch([(prob, gt)], (h, w), 0.97)
    shown = EdgeMetric(max_dist=0.03).best_map(pred, target)
    np.testing.assert_array_equal(shown, thin((prob >= 0.5)[None])[0])
    assert shown[10, 6:-6].all() and shown.sum() <= 30


def test_edge_empty_and_invalid_options():
    assert math.isnan(EdgeMetric().compute()["odsf"])
    for bad in ({"max_dist": 0.0}, {"num_thresholds": 0}, {"levels": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EdgeMetric(**bad)


# ----------------------------------------------------------------------------- end to end
def test_pascal_run_reports_the_benchmark_measures_and_eval_can_rescore(pascal_run, capsys):
    """The five-task synthetic preset scores with the published measures; ``mtpsl eval
    --edge-measure dilation`` re-scores the run's edges with the fast approximation."""
    from mtpsl.cli import main

    final = json.loads((pascal_run / "final_metrics.json").read_text())
    flat = json.dumps(final)
    assert all(key in flat for key in ("edges/odsf", "edges/oisf", "saliency/maxf",
                                       "saliency/miou"))
    assert "odsf_dilation" not in flat and "_pooled" not in flat
    capsys.readouterr()
    assert main(["eval", "--json", "--run", str(pascal_run), "--device", "cpu",
                 "--edge-measure", "dilation"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert "edges/odsf_dilation" in metrics and "edges/odsf" not in metrics
    assert main(["eval", "--json", "--run", str(pascal_run), "--device", "cpu",
                 "--edge-workers", "1"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert metrics["edges/odsf"] == final["metrics"]["edges/odsf"]


def test_bench_edge_eval_runs_and_records_its_command(tmp_path):
    out = tmp_path / "r.json"
    argv = ["--images", "2", "--image-size", "30", "40", "--pad", "48", "--out", str(out)]
    result = load_benchmark("bench_edge_eval").main(argv)
    assert json.loads(out.read_text())["command"].endswith(" ".join(argv))
    assert all(v > 0 for v in result["seconds_per_image"].values())
