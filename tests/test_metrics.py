"""Metrics checked against brute-force numpy references over the concatenated evaluation set.

Why: the library's metrics stream over uneven batches; only agreement with a global,
independently written reference proves they are not per-batch averages in disguise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from mtpsl.engine.evaluate import accumulate
from mtpsl.metrics import (
    METRICS,
    DepthMetric,
    Metric,
    NormalMetric,
    SegmentationMetric,
    _float_dtype,
    argmax_classes,
    build_metric,
    delta_m,
)

from conftest import load_benchmark

RTOL = 1e-6
SPLITS = (1, 3, 2, 1)  # uneven batch sizes, 7 images in all


def _batches(*arrays: np.ndarray, splits: Sequence[int] = SPLITS) -> list[list[torch.Tensor]]:
    out, start = [], 0
    for n in splits:
        out.append([torch.from_numpy(a[start : start + n].copy()) for a in arrays])
        start += n
    assert start == len(arrays[0])
    return out


def _feed(metric: Metric, batches: list[list[torch.Tensor]]) -> dict[str, float]:
    for pred, target in batches:
        metric.update(pred, target)
    return metric.compute()


def _assert_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=RTOL, abs=1e-12, nan_ok=True), k


# ---------------------------------------------------------------- segmentation


def brute_segmentation(
    labels: np.ndarray, target: np.ndarray, c: int
) -> tuple[dict[str, float], list[float], list[int]]:
    """Pixel loop: per-class TP/FP/FN; a gt pixel predicted out of range is a FN."""
    tp, fp, fn = np.zeros(c), np.zeros(c), np.zeros(c)
    gt_count = np.zeros(c)
    for g, p in zip(target.ravel().tolist(), labels.ravel().tolist(), strict=True):
        if not 0 <= g < c:
            continue
        gt_count[g] += 1
        if p == g:
            tp[g] += 1
        else:
            fn[g] += 1
            if 0 <= p < c:
                fp[p] += 1
    ious = [
        tp[i] / (tp[i] + fp[i] + fn[i]) if tp[i] + fp[i] + fn[i] else math.nan for i in range(c)
    ]
    finite = [v for v in ious if not math.isnan(v)]
    scalars = {
        "miou": sum(finite) / len(finite) if finite else math.nan,
        "pixel_acc": float(tp.sum() / gt_count.sum()) if gt_count.sum() else math.nan,
        "n_absent_classes": float((gt_count == 0).sum()),
    }
    return scalars, ious, [i for i in range(c) if gt_count[i] == 0]


def _seg_data(rng: np.random.Generator, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Scores and targets; gt uses classes 0..c-2 plus -1/255 ignores, class c-1 absent."""
    scores = rng.normal(size=(7, c, 6, 5)).astype(np.float32)
    target = rng.integers(-1, c - 1, size=(7, 6, 5)).astype(np.int64)
    target[target == 2] = np.where(rng.random((target == 2).sum()) < 0.5, 2, 255)
    target[2] = -1  # an all-ignore image: batch 2 (images 1..3) contains it
    target[6] = -1  # batch 4 is entirely ignored
    return scores, target


def test_segmentation_matches_brute_force_with_absent_class() -> None:
    rng = np.random.default_rng(0)
    scores, target = _seg_data(rng)
    scores[:, 4] = -np.inf  # class 4: absent from gt AND pred -> NaN IoU, skipped
    want, ious, absent = brute_segmentation(scores.argmax(1), target, 5)
    m = SegmentationMetric(5)
    got = _feed(m, _batches(scores, target))
    _assert_close(got, want)
    assert math.isnan(m.per_class_iou[4]) and math.isnan(ious[4])
    np.testing.assert_allclose(m.per_class_iou[:4], ious[:4], rtol=RTOL)
    assert m.absent_classes == absent == [4]
    assert got["n_absent_classes"] == 1.0


def test_segmentation_class_absent_from_gt_but_predicted_has_iou_zero() -> None:
    rng = np.random.default_rng(1)
    scores, target = _seg_data(rng)
    scores[:, 4] = -np.inf
    scores[0, 4, 0, :] = 1e6  # predict class 4 on one row
    want, _, _ = brute_segmentation(scores.argmax(1), target, 5)
    m = SegmentationMetric(5)
    got = _feed(m, _batches(scores, target))
    _assert_close(got, want)
    assert m.per_class_iou[4] == 0.0
    assert m.absent_classes == [4]


def test_segmentation_class_map_equals_scores_and_bad_ids_are_misses() -> None:
    rng = np.random.default_rng(2)
    scores, target = _seg_data(rng)
    labels = scores.argmax(1).astype(np.int64)
    by_scores = _feed(SegmentationMetric(5), _batches(scores, target))
    by_map = _feed(SegmentationMetric(5), _batches(labels, target))
    assert by_scores == pytest.approx(by_map, nan_ok=True)
    labels[0, 0, :] = 7  # out-of-range predictions: wrong for their gt class
    labels[1, 0, :] = -3
    want, _, _ = brute_segmentation(labels, target, 5)
    _assert_close(_feed(SegmentationMetric(5), _batches(labels, target)), want)


@pytest.mark.parametrize("classes", [1, 2, 5, 13, 300])
def test_argmax_classes_is_argmax_with_ties_nan_and_inf(classes: int) -> None:
    """The CPU plane-by-plane scan must reproduce argmax exactly: first maximum on ties,
    first NaN wins, -inf/+inf ordinary values."""
    g = torch.Generator().manual_seed(classes)
    x = torch.randint(-2, 3, (3, classes, 7, 9), generator=g).float()  # many ties
    u = torch.rand(x.shape, generator=g)
    x[u < 0.05] = math.nan
    x[(u >= 0.05) & (u < 0.1)] = -math.inf
    x[(u >= 0.1) & (u < 0.12)] = math.inf
    x[0, :, 0, 0] = math.nan  # all NaN
    x[0, :, 0, 1] = -math.inf  # all -inf
    assert torch.equal(argmax_classes(x), x.argmax(dim=1))
    assert torch.equal(argmax_classes(x.to(torch.bfloat16)), x.to(torch.bfloat16).argmax(1))


def test_accumulate_takes_half_precision_predictions() -> None:
    """bf16 predictions (autocast) go in as they are; results equal their fp32 widening."""
    rng = np.random.default_rng(6)
    scores, target = _seg_data(rng)
    npred, ntarget = _normal_data(rng)
    preds = {
        "seg": torch.from_numpy(scores).bfloat16(),
        "normal": torch.from_numpy(npred).bfloat16(),
    }
    targets = {"seg": torch.from_numpy(target), "normal": torch.from_numpy(ntarget)}
    half = {"seg": SegmentationMetric(5), "normal": NormalMetric()}
    full = {"seg": SegmentationMetric(5), "normal": NormalMetric()}
    accumulate(half, preds, targets)
    accumulate(full, {k: v.float() for k, v in preds.items()}, targets)
    for name in half:
        assert half[name].compute() == pytest.approx(full[name].compute(), nan_ok=True)
    want = brute_normal(preds["normal"].float().numpy(), ntarget)
    assert half["normal"].compute()["mean"] == pytest.approx(want["mean"], rel=RTOL)


def test_segmentation_all_ignore_gives_nan_and_reset_clears() -> None:
    m = SegmentationMetric(3)
    m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.full((2, 4, 4), -1))
    got = m.compute()
    assert math.isnan(got["miou"]) and math.isnan(got["pixel_acc"])
    assert m.absent_classes == [0, 1, 2]
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    m.reset()
    assert m.absent_classes == [] and m.per_class_iou == []
    m.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    got = m.compute()
    assert got["pixel_acc"] == 0.5
    assert got["miou"] == pytest.approx(0.25)  # class 0: 1/2, class 1: 0/1


def test_segmentation_input_checks() -> None:
    m = SegmentationMetric(4)
    target = torch.zeros(2, 5, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"expected shape \(2, 4, 5, 6\).*got \(2, 3, 5, 6\)"):
        m.update(torch.zeros(2, 3, 5, 6), target)
    with pytest.raises(ValueError, match="expected shape"):
        m.update(torch.zeros(2, 5, 7, dtype=torch.long), target)
    with pytest.raises(ValueError, match="must be integer"):
        m.update(torch.zeros(2, 5, 6), target)
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2, 4, 5, 6), target.float())
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetric(0)


# ---------------------------------------------------------------------- depth


def brute_depth(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    p, g = pred.astype(np.float64).ravel(), target.astype(np.float64).ravel()
    keep = (g != 0) & np.isfinite(g)
    p, g = p[keep], g[keep]
    ratio = np.full(p.shape, np.inf)
    ok = p > 0
    ratio[ok] = np.maximum(p[ok] / g[ok], g[ok] / p[ok])
    return {
        "abs_err": float(np.mean(np.abs(p - g))),
        "rel_err": float(np.mean(np.abs(p - g) / g)),
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        **{f"delta{k}": float(np.mean(ratio < 1.25**k) * 100) for k in (1, 2, 3)},
    }


def _depth_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    target = rng.uniform(0.5, 10, size=(7, 1, 8, 6)).astype(np.float32)
    target[rng.random(target.shape) < 0.3] = 0  # invalid pixels
    target[0, 0, 0, 0] = np.nan
    target[3, 0, 1, 1] = np.inf
    target[6] = 0  # an all-invalid batch
    pred = (target * rng.uniform(0.6, 1.6, size=target.shape)).astype(np.float32)
    pred = np.nan_to_num(pred, nan=1.0, posinf=1.0) + rng.normal(0, 0.1, size=target.shape)
    pred = pred.astype(np.float32)
    pred[1, 0, 2, :] = -0.5  # negative predictions: never "within"
    return pred, target


def test_depth_matches_brute_force() -> None:
    pred, target = _depth_data(np.random.default_rng(3))
    assert (pred[target > 0] <= 0).any()
    _assert_close(_feed(DepthMetric(), _batches(pred, target)), brute_depth(pred, target))


def test_depth_signed_zeros_and_non_finite_values_match_brute_force() -> None:
    """-0.0 predictions have no ratio (never "within"), -0.0 and +-inf targets are unlabelled,
    and non-finite predictions at unlabelled pixels are ignored."""
    pred, target = _depth_data(np.random.default_rng(7))
    pred[2, 0, 0, :] = -0.0
    pred[2, 0, 1, :] = 0.0
    target[4, 0, 0, :] = -0.0
    target[4, 0, 1, 0] = -np.inf
    target[5, 0, 2, :] = 0
    pred[5, 0, 2, :] = [np.nan, np.inf, -np.inf, np.nan, 1.0, 2.0]
    assert (target[2, 0, :2] > 0).any()
    _assert_close(_feed(DepthMetric(), _batches(pred, target)), brute_depth(pred, target))


def test_float64_inputs_are_computed_in_float64() -> None:
    """float32 is the fast default; a caller passing float64 keeps float64 exactness."""
    rng = np.random.default_rng(8)
    target = rng.uniform(0.5, 10, size=(2, 1, 4, 5))
    pred = target * (1 + rng.normal(0, 1e-9, size=target.shape))  # below float32 resolution
    got = _feed(DepthMetric(), _batches(pred, target, splits=(1, 1)))
    want = brute_depth(pred, target)
    assert got["abs_err"] == pytest.approx(want["abs_err"], rel=1e-9)
    npred, ntarget = _normal_data(rng)
    npred64, ntarget64 = npred.astype(np.float64), ntarget.astype(np.float64)
    got = _feed(NormalMetric(), _batches(npred64, ntarget64))
    assert got["mean"] == pytest.approx(brute_normal(npred64, ntarget64)["mean"], rel=1e-12)


def test_depth_no_valid_pixels_and_reset() -> None:
    m = DepthMetric()
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0))
    m.reset()
    m.update(torch.full((1, 1, 1, 2), 2.0), torch.tensor([[[[1.0, 2.0]]]]))
    got = m.compute()
    assert got["abs_err"] == 0.5 and got["rel_err"] == 0.5 and got["delta1"] == 50.0


def test_depth_input_checks() -> None:
    m = DepthMetric()
    with pytest.raises(ValueError, match=r"expected shape \(2, 1, 4, 4\), got \(2, 1, 4, 5\)"):
        m.update(torch.zeros(2, 1, 4, 5), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        m.update(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        m.update(torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(2, 1, 4, 4))


# --------------------------------------------------------------------- normals


def brute_angles(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel loop over valid pixels; pred normalised with a 1e-12 floor, target as given."""
    angles = []
    b, _, h, w = target.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = target[i, :, y, x].astype(np.float64)
                if not np.any(t != 0):
                    continue
                p = pred[i, :, y, x].astype(np.float64)
                p = p / max(float(np.linalg.norm(p)), 1e-12)
                angles.append(math.degrees(math.acos(min(1.0, max(-1.0, float(p @ t))))))
    return np.asarray(angles)


def brute_normal(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    a = brute_angles(pred, target)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "rmse": float(np.sqrt(np.mean(a**2))),
        "within_11_25": float(np.mean(a < 11.25) * 100),
        "within_22_5": float(np.mean(a < 22.5) * 100),
        "within_30": float(np.mean(a < 30) * 100),
    }


def _normal_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    target = rng.normal(size=(7, 3, 6, 5))
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    target[np.broadcast_to(rng.random((7, 1, 6, 5)) < 0.25, target.shape)] = 0  # invalid
    target[5] = 0  # an all-invalid batch
    # unnormalised predictions near the target (so thresholds are exercised), varied scale
    pred = (target + rng.normal(0, 0.4, size=target.shape)) * rng.uniform(0.1, 5, (7, 1, 6, 5))
    pred[0, :, 0, 0] = 0  # zero prediction: normalisation must not divide by zero
    return pred.astype(np.float32), target.astype(np.float32)


def test_normal_matches_brute_force() -> None:
    pred, target = _normal_data(np.random.default_rng(4))
    bin_deg = 1e-3
    got = _feed(NormalMetric(bin_deg), _batches(pred, target))
    want = brute_normal(pred, target)
    assert abs(got.pop("median") - want.pop("median")) <= bin_deg / 2 + 1e-9
    _assert_close(got, want)


@pytest.mark.parametrize(
    ("angles", "median"), [((10.0, 20.0, 30.0), 20.0), ((10.0, 20.0, 30.0, 41.0), 25.0)]
)
def test_normal_median_odd_and_even_counts(angles: tuple[float, ...], median: float) -> None:
    theta = np.radians(np.asarray(angles))
    n = len(angles)
    target = np.zeros((1, 3, 1, n + 1), dtype=np.float32)
    target[0, 2, 0, :n] = 1  # last pixel invalid
    pred = np.zeros_like(target)
    pred[0, 0, 0, :n] = 3 * np.sin(theta)
    pred[0, 2, 0, :n] = 3 * np.cos(theta)
    pred[0, :, 0, n] = 1.0
    assert float(np.median(brute_angles(pred, target))) == pytest.approx(median, abs=1e-4)
    for bin_deg in (0.5, 1e-3):
        m = NormalMetric(bin_deg)
        m.update(torch.from_numpy(pred), torch.from_numpy(target))
        assert abs(m.compute()["median"] - median) <= bin_deg / 2 + 1e-4


def test_normal_reset_and_input_checks() -> None:
    m = NormalMetric()
    m.update(torch.randn(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(torch.randn(1, 3, 2, 2), torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    m.reset()
    same = torch.tensor([0.0, 0, 2]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    m.update(same, same / 2)
    got = m.compute()
    assert got["mean"] == pytest.approx(0, abs=1e-6) and got["within_11_25"] == 100.0
    with pytest.raises(ValueError, match=r"expected shape \[B, 3, H, W\], got \(1, 1, 2, 2\)"):
        m.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"expected shape \(1, 3, 2, 2\), got \(1, 3, 2, 3\)"):
        m.update(torch.zeros(1, 3, 2, 3), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="median_bin_deg"):
        NormalMetric(0.0)


# ------------------------------------------------------- distributed-style sums


@pytest.mark.parametrize("name", ["segmentation", "depth", "normal"])
def test_state_tensors_summed_across_instances_equal_single_instance(name: str) -> None:
    rng = np.random.default_rng(5)
    kwargs: dict[str, object] = {"num_classes": 5} if name == "segmentation" else {}
    data = {"segmentation": _seg_data, "depth": _depth_data, "normal": _normal_data}[name](rng)
    batches = _batches(*data)
    whole = _feed(build_metric(name, **kwargs), batches)
    rank0, rank1 = build_metric(name, **kwargs), build_metric(name, **kwargs)
    for i, (pred, target) in enumerate(batches):
        (rank0 if i % 2 else rank1).update(pred, target)
    for mine, theirs in zip(rank0.state_tensors(), rank1.state_tensors(), strict=True):
        mine += theirs  # what all_reduce(SUM) does in place
    assert rank0.compute() == pytest.approx(whole, rel=1e-12, nan_ok=True)


def test_accumulator_dtypes_and_device_follow_prediction() -> None:
    for m in (SegmentationMetric(3), DepthMetric(), NormalMetric()):
        for t in m.state_tensors():
            assert t.dtype in (torch.int64, torch.float64)
    assert _float_dtype(torch.device("mps")) == torch.float32
    assert _float_dtype(torch.device("cpu")) == torch.float64
    if torch.cuda.is_available():
        m = DepthMetric()
        m.update(torch.ones(1, 1, 2, 2, device="cuda"), torch.ones(1, 1, 2, 2, device="cuda"))
        assert all(t.is_cuda for t in m.state_tensors())
        assert m.compute()["abs_err"] == 0.0


def test_registry_and_higher_is_better() -> None:
    assert set(METRICS.names()) >= {"segmentation", "depth", "normal"}
    assert isinstance(build_metric("normal", median_bin_deg=0.1), NormalMetric)
    for cls, keys in (
        (SegmentationMetric, SegmentationMetric(2).compute()),
        (DepthMetric, DepthMetric().compute()),
        (NormalMetric, NormalMetric().compute()),
    ):
        assert set(cls.higher_is_better) == set(keys)
    assert SegmentationMetric.higher_is_better["n_absent_classes"] is False
    assert DepthMetric.higher_is_better["delta1"] and not NormalMetric.higher_is_better["median"]


# ---------------------------------------------------------------------- delta_m


def test_delta_m_sign_conventions() -> None:
    hib = {"semantic/miou": True, "depth/abs_err": False}
    base = {"semantic/miou": 0.40, "depth/abs_err": 0.50}
    # miou +10% (0.44 vs 0.40) is a gain; abs_err 0.60 vs 0.50 is +20% error, i.e. -20%.
    got = delta_m({"semantic/miou": 0.44, "depth/abs_err": 0.60}, base, hib)
    assert got == pytest.approx((10.0 - 20.0) / 2)
    assert delta_m(base, base, hib) == 0.0
    # lower error is a gain; short keys resolve through a metric class's own table
    short = {**SegmentationMetric.higher_is_better, **DepthMetric.higher_is_better}
    got = delta_m({"semantic/miou": 0.36, "depth/abs_err": 0.45}, base, short)
    assert got == pytest.approx((-10.0 + 10.0) / 2)


def test_delta_m_errors_name_the_key() -> None:
    hib = {"a/x": True}
    with pytest.raises(ValueError, match=r"'a/y'.*baseline"):
        delta_m({"a/y": 1.0}, {"a/x": 1.0}, hib)
    with pytest.raises(ValueError, match=r"'a/y'.*higher_is_better"):
        delta_m({"a/y": 1.0}, {"a/y": 1.0}, hib)
    with pytest.raises(ValueError, match=r"'a/x'.*is 0"):
        delta_m({"a/x": 1.0}, {"a/x": 0.0}, hib)


# ------------------------------------------------------------------- benchmark smoke


@pytest.mark.parametrize("dataset", ["nyuv2", "pascal"])
def test_bench_eval_streaming_agrees_with_naive_host_path(dataset: str, tmp_path: Path) -> None:
    """benchmarks/bench_eval.py runs both paths on the same batches; their metrics agree
    (the streaming normal median is a 1e-3 degree bin, so within 5e-4 of numpy's)."""
    bench = load_benchmark("bench_eval")
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--dataset", dataset, "--height", "40", "--width", "56",
            "--batch-size", "2", "--batches", "2", "--repeats", "1", "--out", str(out)]
    report = bench.main(argv)
    assert json.loads(out.read_text())["command"].endswith(" ".join(argv))
    assert report["max_abs_metric_gap"] < 5e-4 + 1e-6, report["max_gap_metric"]
    want = {"nyuv2": {"semantic/miou", "depth/abs_err", "normal/median"},
            "pascal": {"parts/miou", "saliency/maxf", "edges/odsf_dilation",
                       "normal/mean"}}[dataset]
    assert want <= set(report["metrics"])
    assert report["streaming_images_per_s"] > 0 and report["naive_host_images_per_s"] > 0
