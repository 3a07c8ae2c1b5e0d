"""Streaming evaluation metrics for dense prediction, computed globally over an evaluation set.

Why global: averaging per-batch scores weights a batch of 2 images like a batch of 8 and makes
mIoU depend on the batch size. Every metric here keeps raw counts (int64) and sums (float64;
float32 on devices without float64, such as MPS) on the device that holds the predictions, so
``update`` never calls ``.item()``/``.cpu()`` and never forces a host sync: counting uses
``scatter_add_`` (a sync-free, bincount-equivalent scatter; ``torch.bincount`` on CUDA reads
its input's max back to the host). Per-pixel maths runs in float32 (float64 if the inputs
are), sums accumulate in float64, counts in int64. ``compute`` is the one place values reach
the host, and ``state_tensors`` exposes the accumulators so a DDP trainer can
``all_reduce(SUM)`` them first.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "Metrics".
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.registry import Registry

__all__ = [
    "METRICS",
    "DepthMetric",
    "EdgeMetric",
    "Metric",
    "NormalMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "build_metric",
    "delta_m",
]

METRICS: Registry[type[Metric]] = Registry("metric")


def _float_dtype(device: torch.device) -> torch.dtype:
    """float64 sums keep long evaluations exact enough; MPS has no float64, so fall back."""
    return torch.float32 if device.type == "mps" else torch.float64


def _work_float(*tensors: Tensor) -> list[Tensor]:
    """Detached copies for per-pixel maths: float32 (half precision is widened), or float64
    when an input already is (its caller asked for that precision)."""
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.detach().to(dt) for t in tensors]


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _count_into(acc: Tensor, index: Tensor, keep: Tensor | None = None) -> None:
    """acc[index[i]] += keep[i] for all i (1 without ``keep``): a bincount into a persistent
    1-D accumulator, with no host sync.

    Excluded elements (keep=False) must still carry an in-range index; they add zero.
    ``scatter_add_`` rather than ``torch.bincount``: the latter reads the largest index back
    to the host on CUDA, and on CPU it is no faster than this scatter.
    """
    index = index.reshape(-1)
    if keep is None:
        ones = torch.ones((), dtype=acc.dtype, device=acc.device).expand(index.shape)
        acc.scatter_add_(0, index, ones)
    else:
        acc.scatter_add_(0, index, keep.reshape(-1).to(acc.dtype))


def _count_below(x: Tensor, threshold: float, acc_dtype: torch.dtype) -> Tensor:
    """Number of elements ``< threshold`` (NaN never is), as a 0-d int64 tensor on x's device.

    The comparison is written as 0/1 floats and summed in ``acc_dtype`` (exact: float64 up to
    2^53 elements): writing a bool tensor is several times slower on CPU.
    """
    flags = torch.lt(x, threshold, out=torch.empty_like(x))
    return flags.sum(dtype=acc_dtype).to(torch.int64)


def argmax_classes(scores: Tensor) -> Tensor:
    """Class map of ``[B, C, H, W]`` scores, exactly ``scores.argmax(dim=1)``: the first
    maximum, and the first NaN if there is one (argmax counts NaN as the maximum).

    On CPU, reductions over the strided class axis are slow (``argmax`` ~4x, ``max`` ~2x the
    time of numpy), so the classes are scanned one plane at a time with contiguous
    elementwise ops, flags written as 0/1 floats (bool outputs are slow there too). CUDA
    reduces the strided axis at memory speed: ``max(dim=1).indices`` (same definition).
    """
    if scores.device.type != "cpu" or scores.shape[1] > 2**24:
        return scores.max(dim=1).indices
    planes = scores.unbind(1)
    best = planes[0].clone()
    f32 = {"dtype": torch.float32}  # flags and ids in float32 (bf16 holds ids only to 256)
    index = torch.zeros_like(best, **f32)
    flag, nan = torch.empty_like(best, **f32), torch.empty_like(best, **f32)
    best_nan = torch.ne(best, best, out=torch.empty_like(best, **f32))
    for c, plane in enumerate(planes[1:], start=1):
        torch.gt(plane, best, out=flag)
        torch.ne(plane, plane, out=nan)
        flag.addcmul_(nan, 1.0 - best_nan)  # a first NaN takes over; later NaNs do not
        index.addcmul_(flag, c - index)  # index = c where flagged (exact small integers)
        torch.maximum(best, plane, out=best)  # propagates NaN
        best_nan.add_(nan).clamp_(max=1.0)
    return index.long()


class Metric(ABC):
    """A streaming metric: ``update`` per batch, ``compute`` once, ``reset`` between evaluations.

    Accumulators live in ``self._state`` (name -> tensor) on the predictions' device. The first
    ``update`` moves them there if they were created elsewhere; call ``to(device)`` beforehand
    on a DDP rank that may see no data, so every rank reduces tensors on the same device.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {}

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._state: dict[str, Tensor] = {}
        self.reset()

    @property
    def device(self) -> torch.device:
        return self._device

    @abstractmethod
    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        """Fresh zeroed accumulators."""

    @abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch to the accumulators (on device, no host sync)."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Turn the accumulated state into host floats."""

    def reset(self) -> None:
        self._state = self._new_state(self._device, _float_dtype(self._device))

    def state_tensors(self) -> list[Tensor]:
        """The accumulator tensors themselves (not copies): in-place all_reduce(SUM) is seen by
        ``compute``. Fetch them after the last ``update``; a device move replaces them."""
        return list(self._state.values())

    def to(self, device: torch.device | str) -> Metric:
        """Move the accumulators (keeping their contents) to ``device``."""
        device = torch.device(device)
        fdt = _float_dtype(device)
        self._state = {
            k: v.to(device=device, dtype=fdt if v.is_floating_point() else v.dtype)
            for k, v in self._state.items()
        }
        self._device = device
        return self

    def _follow(self, pred: Tensor, target: Tensor) -> None:
        """Check pred/target share a device and put the accumulators there."""
        if pred.device != target.device:
            raise ValueError(
                f"{type(self).__name__}: pred is on {pred.device} but target is on "
                f"{target.device}; put both on the same device"
            )
        if pred.device != self._device:
            self.to(pred.device)

    def _host(self) -> dict[str, Tensor]:
        """The one device->host transfer, in float64/int64 for the final arithmetic."""
        return {
            k: v.detach().cpu().to(torch.float64 if v.is_floating_point() else torch.int64)
            for k, v in self._state.items()
        }

    def _host_counts(self) -> tuple[dict[str, Tensor], int, Tensor]:
        """Host state, the valid-pixel count and the ``within`` counters in percent."""
        s = self._host()
        n = int(s["count"])
        return s, n, s["within"].to(torch.float64) * (100.0 / max(n, 1))


@METRICS.register("segmentation")
class SegmentationMetric(Metric):
    """mIoU and pixel accuracy from a global confusion matrix.

    ``pred`` is ``[B, C, H, W]`` scores/log-probs (argmax over C) or a ``[B, H, W]`` integer
    class map; ``target`` is ``[B, H, W]`` integer, any value outside ``[0, C)`` (e.g. -1)
    is ignored. A predicted class id outside ``[0, C)`` counts as a miss for its gt class
    (an extra confusion column) rather than being dropped, so it cannot inflate accuracy.
    After ``compute``: ``absent_classes`` (ids with no gt pixel) and ``per_class_iou``
    (NaN where a class is absent from both gt and pred; such classes are skipped by mIoU).
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "miou": True,
        "pixel_acc": True,
        "n_absent_classes": False,
    }

    def __init__(self, num_classes: int, device: torch.device | str | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.absent_classes: list[int] = []
        self.per_class_iou: list[float] = []
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        c = self.num_classes
        # rows: gt class; columns: predicted class, plus column C = "invalid prediction".
        return {"confusion": torch.zeros(c, c + 1, dtype=torch.int64, device=device)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        c = self.num_classes
        if target.ndim != 3 or target.is_floating_point() or target.is_complex():
            raise ValueError(
                f"segmentation target must be an integer [B, H, W] tensor, got dtype "
                f"{target.dtype} with shape {_shape(target)}"
            )
        b, h, w = _shape(target)
        if pred.ndim == 4:
            expected = (b, c, h, w)
            if _shape(pred) != expected:
                raise ValueError(
                    f"segmentation pred scores: expected shape {expected} (target "
                    f"{_shape(target)}, num_classes={c}), got {_shape(pred)}"
                )
            labels = argmax_classes(pred.detach())
        elif pred.ndim == 3:
            if pred.is_floating_point() or pred.is_complex():
                raise ValueError(
                    f"segmentation pred class map must be integer, got {pred.dtype}; "
                    f"pass scores as [B, C, H, W] instead"
                )
            if _shape(pred) != (b, h, w):
                raise ValueError(
                    f"segmentation pred class map: expected shape {(b, h, w)}, got {_shape(pred)}"
                )
            labels = pred
        else:
            raise ValueError(
                f"segmentation pred: expected [B, C, H, W] scores or [B, H, W] class map "
                f"matching target {_shape(target)}, got {_shape(pred)}"
            )
        self._follow(pred, target)
        if pred.ndim == 3:  # a given class map may hold ids outside [0, C)
            labels = labels.long()
            labels = torch.where((labels >= 0) & (labels < c), labels, c)
        # Rows of a scratch matrix: 0 = gt < 0, 1..C = classes, C + 1 = gt >= C; the two
        # ignore rows are dropped. Clamping is cheaper than building a validity mask.
        row = target.long().clamp(-1, c) + 1
        scratch = torch.zeros((c + 2) * (c + 1), dtype=torch.int64, device=labels.device)
        _count_into(scratch, row * (c + 1) + labels)
        self._state["confusion"] += scratch.view(c + 2, c + 1)[1:-1]

    def compute(self) -> dict[str, float]:
        c = self.num_classes
        conf = self._host()["confusion"].to(torch.float64)
        tp = conf[:, :c].diagonal()
        gt_count = conf.sum(dim=1)
        pred_count = conf[:, :c].sum(dim=0)
        union = gt_count + pred_count - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        self.per_class_iou = [float(v) for v in iou]
        self.absent_classes = [i for i in range(c) if gt_count[i] == 0]
        total = float(gt_count.sum())
        return {
            "miou": float(torch.nanmean(iou)),
            "pixel_acc": float(tp.sum()) / total if total > 0 else math.nan,
            "n_absent_classes": float(len(self.absent_classes)),
        }

    def reset(self) -> None:
        super().reset()
        self.absent_classes = []
        self.per_class_iou = []


def _check_dense_pair(name: str, pred: Tensor, target: Tensor, channels: int) -> None:
    if target.ndim != 4 or target.shape[1] != channels:
        raise ValueError(
            f"{name} target: expected shape [B, {channels}, H, W], got {_shape(target)}"
        )
    if _shape(pred) != _shape(target):
        raise ValueError(f"{name} pred: expected shape {_shape(target)}, got {_shape(pred)}")
    for role, t in (("pred", pred), ("target", target)):
        if not t.is_floating_point():
            raise ValueError(f"{name} {role} must be a floating tensor, got {t.dtype}")


@METRICS.register("depth")
class DepthMetric(Metric):
    """Depth errors over valid pixels (target != 0 and finite), pooled over the whole set.

    ``delta_k`` is the percentage of valid pixels with ``max(p/g, g/p) < 1.25**k``; a
    non-positive prediction (or target) has no meaningful ratio and counts as outside.

    Per-pixel arithmetic is float32 (what a float32 prediction carries anyway), each batch's
    sums are accumulated in float64. So a ratio within one float32 rounding (~6e-8 relative)
    of ``1.25**k`` may fall on the other side of the threshold than in float64.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "abs_err": False,
        "rel_err": False,
        "rmse": False,
        "delta1": True,
        "delta2": True,
        "delta3": True,
    }

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "abs": torch.zeros((), dtype=float_dtype, device=device),
            "rel": torch.zeros((), dtype=float_dtype, device=device),
            "sq": torch.zeros((), dtype=float_dtype, device=device),
            "within": torch.zeros(3, dtype=torch.int64, device=device),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_dense_pair("depth", pred, target, 1)
        self._follow(pred, target)
        s = self._state
        acc = s["abs"].dtype
        p, g = _work_float(pred, target)
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite = unlabelled
        valid = g.bool()
        # Masking with torch.where, not boolean indexing: indexing would sync to size the output.
        diff = torch.where(valid, p - g, 0.0)
        adiff = diff.abs()
        g_safe = g + torch.eq(g, 0.0, out=torch.empty_like(g))  # 1 where unlabelled
        s["count"] += valid.sum()
        s["abs"] += adiff.sum(dtype=acc)
        s["rel"] += (adiff / g_safe).sum(dtype=acc)
        s["sq"] += (diff * diff).sum(dtype=acc)
        # Unless p > 0 and g > 0 the ratio is inf or NaN (x / 0 with x >= 0), never "within";
        # + 0.0 turns -0.0 into +0.0 so that 1 / 0 is +inf.
        p_pos = p.clamp_min(0.0).add_(0.0)
        g_pos = g.clamp_min(0.0).add_(0.0)
        ratio = torch.maximum(p_pos / g_pos, g_pos / p_pos)
        s["within"] += torch.stack([_count_below(ratio, 1.25**k, acc) for k in (1, 2, 3)])

    def compute(self) -> dict[str, float]:
        s, n, within = self._host_counts()
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        return {
            "abs_err": float(s["abs"]) / n,
            "rel_err": float(s["rel"]) / n,
            "rmse": math.sqrt(float(s["sq"]) / n),
            "delta1": float(within[0]),
            "delta2": float(within[1]),
            "delta3": float(within[2]),
        }


NORMAL_THRESHOLDS_DEG: tuple[float, ...] = (11.25, 22.5, 30.0)


def _normal_angles(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel angle in degrees ``[B, H, W]`` (0 where invalid) and the valid mask.

    The three channels are combined by hand: ``norm``/``any``/``sum`` over the strided
    channel axis of an NCHW tensor are an order of magnitude slower on CPU than a few
    elementwise ops on the contiguous channel planes. ``(p . t) / max(|p|, 1e-12)`` is the
    dot product of the normalised prediction with the target, up to rounding.
    """
    px, py, pz = pred.unbind(1)
    tx, ty, tz = target.unbind(1)
    valid = tx.bool() | ty.bool() | tz.bool()  # any non-zero channel (bool() is != 0)
    norm = torch.sqrt(px * px + py * py + pz * pz).clamp_min_(1e-12)
    dot = ((px * tx + py * ty + pz * tz) / norm).clamp_(-1.0, 1.0)
    angle = torch.rad2deg(torch.acos(dot))
    return torch.where(valid, angle, 0.0), valid


@METRICS.register("normal")
class NormalMetric(Metric):
    """Angular error (degrees) of surface normals over valid pixels (any non-zero gt channel).

    The prediction is L2-normalised here (a network head need not output unit vectors); the
    target is used as given (assumed unit). The median comes from a histogram with
    ``median_bin_deg`` bins over [0, 180] so memory does not grow with the set: it is the
    centre of the bin holding the median angle, so its resolution is ``median_bin_deg``
    (1e-3 degrees by default; error <= bin/2 from the median of the angles as computed).
    Threshold percentages are exact counts, mean and RMSE exact sums.

    Angles are computed in float32 per pixel (float64 is ~10x slower on CPU) and summed in
    float64. Measured against float64 on the same float32 inputs, a pixel's angle is off by
    at most ~3e-5 degrees for angles in [20, 120], ~2e-4 in [5, 20], ~1e-3 in [1, 5], and up
    to ~0.04 degrees within 1 degree of 0 or 180, where the float32 cosine is too coarse
    (``acos`` is ill-conditioned there). Set means and medians move far less than that.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "mean": False,
        "median": False,
        "rmse": False,
        "within_11_25": True,
        "within_22_5": True,
        "within_30": True,
    }

    def __init__(
        self, median_bin_deg: float = 1e-3, device: torch.device | str | None = None
    ) -> None:
        if not (0 < median_bin_deg <= 180):
            raise ValueError(f"median_bin_deg must be in (0, 180], got {median_bin_deg!r}")
        self.median_bin_deg = float(median_bin_deg)
        self.num_bins = max(1, math.ceil(180.0 / self.median_bin_deg))
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "sum": torch.zeros((), dtype=float_dtype, device=device),
            "sq": torch.zeros((), dtype=float_dtype, device=device),
            "within": torch.zeros(len(NORMAL_THRESHOLDS_DEG), dtype=torch.int64, device=device),
            "hist": torch.zeros(self.num_bins, dtype=torch.int64, device=device),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        _check_dense_pair("normal", pred, target, 3)
        self._follow(pred, target)
        s = self._state
        acc = s["sum"].dtype
        angle, valid = _normal_angles(*_work_float(pred, target))
        n_valid = valid.sum()
        s["count"] += n_valid
        s["sum"] += angle.sum(dtype=acc)
        s["sq"] += (angle * angle).sum(dtype=acc)
        # invalid pixels hold angle 0, below every threshold: count all, then remove them
        n_invalid = valid.numel() - n_valid
        below = [_count_below(angle, th, acc) for th in NORMAL_THRESHOLDS_DEG]
        s["within"] += torch.stack(below) - n_invalid
        bins = torch.floor(angle / self.median_bin_deg).long().clamp_(0, self.num_bins - 1)
        _count_into(s["hist"], bins, valid)

    def compute(self) -> dict[str, float]:
        s, n, within = self._host_counts()
        if n == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        return {
            "mean": float(s["sum"]) / n,
            "median": self._hist_median(s["hist"]),
            "rmse": math.sqrt(float(s["sq"]) / n),
            "within_11_25": float(within[0]),
            "within_22_5": float(within[1]),
            "within_30": float(within[2]),
        }

    def _hist_median(self, hist: Tensor) -> float:
        """Median from bin counts: mean of the centres of the two middle ranks' bins
        (the same bin for an odd count), so the error stays <= bin/2."""
        n = int(hist.sum())
        if n == 0:
            return math.nan
        cum = hist.cumsum(0)
        ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=cum.dtype)  # 1-based
        idx = torch.searchsorted(cum, ranks, side="left").to(torch.float64)
        return float((idx.mean() + 0.5) * self.median_bin_deg)


def _binary_bins(pred: Tensor, target: Tensor, num_bins: int, name: str) -> tuple[Tensor, Tensor]:
    """Check a binary pred/target pair; return (threshold bin ``[B,H,W]``, valid mask).

    The bin of probability p is ``floor(p * num_bins)`` clamped to ``[0, num_bins - 1]``; the
    prediction is positive at threshold ``k / num_bins`` when its bin is >= k.
    """
    _check_dense_pair(name, pred, target, 1)
    t = target[:, 0]
    valid = ~(t * (1 - t)).bool()  # t == 0 or t == 1, without slow bool-output comparisons
    bins = torch.floor(pred.detach()[:, 0].to(torch.float64 if pred.device.type != "mps"
                                              else torch.float32) * num_bins)
    return bins.clamp(0, num_bins - 1).long(), valid


def _suffix_sums(hist: Tensor) -> Tensor:
    """``out[k] = hist[k:].sum()`` along the last dim: counts at or above each threshold."""
    return hist.flip(-1).cumsum(-1).flip(-1)


def _f_measure(precision: Tensor, recall: Tensor, beta_sq: float) -> Tensor:
    denom = beta_sq * precision + recall
    f = (1 + beta_sq) * precision * recall / denom.clamp_min(1e-300)
    return torch.where(denom > 0, f, torch.zeros_like(f))


@METRICS.register("saliency")
class SaliencyMetric(Metric):
    """Saliency: max F-measure and threshold-max mIoU over a grid of thresholds.

    ``pred`` is a probability map ``[B,1,H,W]``; ``target`` is 0/1, other values ignored.
    Thresholds are ``k / num_bins`` for ``k = 1..num_bins-1`` (0.01..0.99 by default). For
    every threshold, precision and recall come from the counts pooled over the whole set (not
    per image); ``maxf`` is the maximum over thresholds of
    ``F = (1 + b2) P R / (b2 P + R)`` with ``b2 = beta_sq = 0.3``, and ``miou`` the maximum over
    thresholds of the mean of the foreground and background IoU. One pass suffices: a
    histogram of the predicted probabilities per ground-truth class holds every threshold.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"maxf": True, "miou": True}

    def __init__(
        self, num_bins: int = 100, beta_sq: float = 0.3, device: torch.device | str | None = None
    ) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins!r}")
        self.num_bins = int(num_bins)
        self.beta_sq = float(beta_sq)
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        return {"hist": torch.zeros(2, self.num_bins, dtype=torch.int64, device=device)}

    def update(self, pred: Tensor, target: Tensor) -> None:
        bins, valid = _binary_bins(pred, target, self.num_bins, "saliency")
        self._follow(pred, target)
        fg = target[:, 0].bool().long()  # 1 = salient where valid
        _count_into(self._state["hist"].view(-1), fg * self.num_bins + bins, valid)

    def compute(self) -> dict[str, float]:
        hist = self._host()["hist"].to(torch.float64)
        above = _suffix_sums(hist)[:, 1:]  # thresholds k = 1..num_bins-1
        neg, pos = hist.sum(dim=1)
        if pos + neg == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        fp, tp = above[0], above[1]
        fn, tn = pos - tp, neg - fp
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall = tp / pos if pos > 0 else torch.zeros_like(tp)
        iou_fg = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), 1.0)
        iou_bg = torch.where(tn + fp + fn > 0, tn / (tn + fp + fn).clamp_min(1), 1.0)
        return {
            "maxf": float(_f_measure(precision, recall, self.beta_sq).max()),
            "miou": float(((iou_fg + iou_bg) / 2).max()),
        }


def disc_offsets(radius: float) -> list[tuple[int, int]]:
    """Integer offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2`` (always holds (0, 0))."""
    r = math.floor(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
            if dy * dy + dx * dx <= radius * radius]


def _disc_rectangles(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Half-sizes ``(hy, hx)`` of axis-aligned rectangles whose union is the disc.

    Row ``dy`` of the disc spans ``|dx| <= w(dy)``, with ``w`` non-increasing in ``|dy|``; for
    each distinct half-width ``hx``, the rows reaching it form ``|dy| <= hy``. A point of the
    disc lies in the rectangle of its own row's width, and every rectangle point in the disc.
    """
    width: dict[int, int] = {}
    for dy, dx in offsets:
        width[abs(dy)] = max(width.get(abs(dy), 0), abs(dx))
    rects: dict[int, int] = {}
    for dy, hx in width.items():
        rects[hx] = max(rects.get(hx, 0), dy)
    return sorted((hy, hx) for hx, hy in rects.items())


def _disc_max_pooled(x: Tensor, offsets: list[tuple[int, int]]) -> Tensor:
    """``_disc_max`` as the max over the disc's rectangles, each a separable pair of
    ``max_pool2d`` passes (which pad with -inf, i.e. skip outside positions)."""
    x4 = x.unsqueeze(1)
    out: Tensor | None = None
    for hy, hx in _disc_rectangles(offsets):
        y = x4
        if hx:
            y = F.max_pool2d(y, (1, 2 * hx + 1), stride=1, padding=(0, hx))
        if hy:
            y = F.max_pool2d(y, (2 * hy + 1, 1), stride=1, padding=(hy, 0))
        out = y if out is None else torch.maximum(out, y)
    assert out is not None  # offsets always hold (0, 0)
    return out.squeeze(1)


def _disc_max_rows(x: Tensor, offsets: list[tuple[int, int]]) -> Tensor:
    """``_disc_max`` by rows: running horizontal maxima of growing half-width (two shifted
    maxima per step), then the max over the ``2 r + 1`` rows, each with its own half-width:
    about ``4 r`` elementwise passes instead of ``pi r^2``."""
    width: dict[int, int] = {}
    for dy, dx in offsets:
        width[dy] = max(width.get(dy, 0), abs(dx))
    r = max(width.values())  # the centre row is the widest
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, r, r), value=-math.inf)
    rows = {0: padded[..., r : r + w]}
    for hx in range(1, r + 1):
        left, right = padded[..., r - hx : r - hx + w], padded[..., r + hx : r + hx + w]
        rows[hx] = torch.maximum(torch.maximum(rows[hx - 1], left), right)
    out = rows[width[0]][..., r : r + h, :]
    for dy, hx in width.items():
        if dy:
            out = torch.maximum(out, rows[hx][..., r + dy : r + dy + h, :])
    return out


def _disc_max(x: Tensor, offsets: list[tuple[int, int]], pool: bool | None = None) -> Tensor:
    """Grey-scale dilation of ``[N, H, W]`` by a disc: the max over ``x[y + dy, x + dx]``,
    positions outside the image skipped (``(0, 0)`` is in every disc, so it is >= ``x``).

    ``pool`` (default: off CPU) uses ``max_pool2d`` over the disc's rectangles, fast on
    CUDA; on CPU ``max_pool2d`` is ~10x slower than elementwise maxima, so rows are used.
    """
    pool = x.device.type != "cpu" if pool is None else pool
    return _disc_max_pooled(x, offsets) if pool else _disc_max_rows(x, offsets)


@METRICS.register("edge")
class EdgeMetric(Metric):
    """Edge detection: optimal-dataset-scale F-measure (``odsf``) with a distance tolerance.

    ``pred`` is an edge probability map ``[B,1,H,W]``; ``target`` is 0/1 (1 = edge), other
    values (padding, -1) ignored. Thresholds are ``k / num_bins``, ``k = 1..num_bins-1``.
    The tolerance radius is ``max_dist * sqrt(H^2 + W^2)`` pixels of the evaluated tensor
    (0.0075 as in the BSDS/PASCAL benchmark; with padded evaluation that is the padded
    image's diagonal). At each threshold, pooled over the whole set:

    * precision = predicted edge pixels with a ground-truth edge pixel within the radius /
      predicted edge pixels;
    * recall = ground-truth edge pixels with a predicted edge pixel within the radius /
      ground-truth edge pixels;

    ``odsf`` is the maximum over thresholds of ``2PR / (P + R)``.

    How this differs from the BSDS MATLAB benchmark (``correspondPixels``, used by the
    reference through SEISM): (1) BSDS thins the thresholded prediction to 1-pixel-wide
    edges first; here there is no thinning, so a blurry, thick prediction keeps the
    precision of its pixels near an edge instead of being reduced to its skeleton; (2) BSDS
    matches predicted and ground-truth pixels one to one (a minimum-cost bipartite
    assignment within the radius), so one predicted pixel can explain only one ground-truth
    pixel and vice versa; here matching is many-to-many (a dilation by a disc), so a thick
    prediction next to a thin edge counts all its pixels as true positives and one predicted
    pixel can recover several ground-truth pixels. For the same pixel sets, many-to-many
    matching never scores lower than one-to-one; without thinning, recall can only be higher
    too, while precision may move either way (a thick band's pixels beyond the radius count
    against it, where its skeleton might not). So the value is typically, not provably, above
    the BSDS one; they agree when predictions and ground truth are thin, isolated edges (e.g. a
    perfect or shifted 1-pixel edge). (3) Precision and recall are
    pooled over the set, as BSDS's ODS does; the per-image optimal scale (OIS) and AP are
    not computed.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"odsf": True}

    def __init__(
        self, max_dist: float = 0.0075, num_bins: int = 100,
        device: torch.device | str | None = None,
    ) -> None:
        if not max_dist >= 0:
            raise ValueError(f"max_dist must be >= 0, got {max_dist!r}")
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins!r}")
        self.max_dist = float(max_dist)
        self.num_bins = int(num_bins)
        self.best: dict[str, float] = {}
        """After ``compute``: the optimal threshold and its precision and recall."""
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        n = self.num_bins
        return {
            "pred_all": torch.zeros(n, dtype=torch.int64, device=device),
            "pred_near": torch.zeros(n, dtype=torch.int64, device=device),
            # index m + 1 for the best prediction bin m within the radius (0: none valid)
            "gt_best": torch.zeros(n + 1, dtype=torch.int64, device=device),
        }

    def update(self, pred: Tensor, target: Tensor) -> None:
        bins, valid = _binary_bins(pred, target, self.num_bins, "edge")
        self._follow(pred, target)
        h, w = bins.shape[-2:]
        offsets = disc_offsets(self.max_dist * math.hypot(h, w))
        gt = valid & target[:, 0].bool()
        masked = (bins + 1) * valid - 1  # -1 where unlabelled
        # both dilations in one pass: gt edges (is one near?) and prediction bins (best near)
        dilated = _disc_max(torch.cat([gt, masked]).to(torch.float32), offsets)
        near, best = dilated[: len(gt)] > 0, dilated[len(gt) :].long() + 1
        s = self._state
        _count_into(s["pred_all"], bins, valid)
        _count_into(s["pred_near"], bins, valid & near)
        _count_into(s["gt_best"], best, gt)

    def compute(self) -> dict[str, float]:
        s = {k: v.to(torch.float64) for k, v in self._host().items()}
        n_gt = float(s["gt_best"].sum())
        if float(s["pred_all"].sum()) == 0:
            return {"odsf": math.nan}
        positives = _suffix_sums(s["pred_all"])[1:]
        hits = _suffix_sums(s["pred_near"])[1:]
        found = _suffix_sums(s["gt_best"])[2:]  # bins m >= k  <=>  index >= k + 1
        precision = torch.where(positives > 0, hits / positives.clamp_min(1), 0.0)
        recall = found / n_gt if n_gt > 0 else torch.zeros_like(found)
        f = _f_measure(precision, recall, 1.0)
        k = int(f.argmax())
        self.best = {"threshold": (k + 1) / self.num_bins, "precision": float(precision[k]),
                     "recall": float(recall[k])}
        return {"odsf": float(f[k])}

    def reset(self) -> None:
        super().reset()
        self.best = {}


def delta_m(
    results: Mapping[str, float],
    baseline: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
) -> float:
    """Multi-task gain in percent: mean over the keys of ``results`` of
    ``(-1)^{lower_is_better} * (M - M_b) / M_b * 100`` (Maninis et al. 2019; Vandenhende et al.).

    Keys are like ``"semantic/miou"``. ``higher_is_better`` is looked up by the full key, then
    by the part after the last ``/`` so a metric class's own ``higher_is_better`` can be passed.
    Only pass the keys that define the gain (e.g. not ``n_absent_classes``).
    """
    if not results:
        raise ValueError("delta_m: results is empty")
    total = 0.0
    for key, value in results.items():
        if key not in baseline:
            raise ValueError(f"delta_m: key {key!r} missing from baseline")
        short = key.rsplit("/", 1)[-1]
        if key in higher_is_better:
            higher = higher_is_better[key]
        elif short in higher_is_better:
            higher = higher_is_better[short]
        else:
            raise ValueError(f"delta_m: key {key!r} missing from higher_is_better")
        base = float(baseline[key])
        if base == 0:
            raise ValueError(f"delta_m: baseline value for key {key!r} is 0")
        sign = 1.0 if higher else -1.0
        total += sign * (float(value) - base) / base * 100.0
    return total / len(results)


def build_metric(name: str, **kwargs: Any) -> Metric:
    """Instantiate a registered metric by config name."""
    return METRICS.get(name)(**kwargs)
