"""Edge maps: ``edge`` (the BSDS protocol of the multi-task PASCAL-Context benchmark: thinned
predictions matched one to one, odsF and oisF; the default) and ``edge_dilation`` (a fast
many-to-many approximation of odsF for monitoring during training)."""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.metrics.base import (
    METRICS,
    Metric,
    _binary_bins,
    _binary_valid,
    _check_dense_pair,
    _count_into,
    _f_measure,
    _suffix_sums,
)
from mtpsl.metrics.bsds import boundary_counts, thin


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


@METRICS.register("edge_dilation")
class DilationEdgeMetric(Metric):
    """Edge detection, fast: an approximation of odsF (``odsf_dilation``) by dilation with a
    disc. Not the published measure (that is :class:`EdgeMetric`); one pass on the device, for
    monitoring during training (``EdgeTask(measure="dilation")``).

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

    higher_is_better: ClassVar[dict[str, bool]] = {"odsf_dilation": True}
    contract_task = ("edge", {"measure": "dilation"})  # the task's fast measure

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
            return {"odsf_dilation": math.nan}
        positives = _suffix_sums(s["pred_all"])[1:]
        hits = _suffix_sums(s["pred_near"])[1:]
        found = _suffix_sums(s["gt_best"])[2:]  # bins m >= k  <=>  index >= k + 1
        precision = torch.where(positives > 0, hits / positives.clamp_min(1), 0.0)
        recall = found / n_gt if n_gt > 0 else torch.zeros_like(found)
        f = _f_measure(precision, recall, 1.0)
        k = int(f.argmax())
        self.best = {"threshold": (k + 1) / self.num_bins, "precision": float(precision[k]),
                     "recall": float(recall[k])}
        return {"odsf_dilation": float(f[k])}

    def best_map(self, pred: Tensor, target: Tensor) -> np.ndarray:
        """One image (``[1, 1, H, W]``) as the 0/1 map it alone scores best at: thresholded
        with the metric's binning at its own best threshold (0.5 where no threshold scores
        above 0: no labelled pixel or no edge, so every threshold ties)."""
        single = DilationEdgeMetric(self.max_dist, self.num_bins)
        single.update(pred, target)
        best = single.compute()["odsf_dilation"]
        cut = single.best["threshold"] if best > 0 else 0.5  # NaN > 0 is False
        k = round(cut * self.num_bins)
        prob = pred[0, 0].detach().cpu().to(torch.float64).numpy()  # bins are taken in float64
        return (np.floor(prob * self.num_bins) >= k).astype(np.float32)

    def reset(self) -> None:
        super().reset()
        self.best = {}


def _f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """BSDS's ``fmeasure``: ``2 P R / (P + R)``, 0 where ``P + R = 0``."""
    total = precision + recall  # symmetric in its arguments
    return 2 * precision * recall / np.where(total > 0, total, 1.0)


def _rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) from ``[4, ...]`` counts, 0 over an empty denominator (BSDS)."""
    matched_r, n_gt, matched_p, n_pred = counts
    return (matched_r / np.where(n_gt > 0, n_gt, 1), matched_p / np.where(n_pred > 0, n_pred, 1))


def _own_best(counts: np.ndarray, decimals: int | None = None) -> int:
    """The threshold index where one image's ``[4, T]`` counts score best (the first), the F
    values rounded to ``decimals`` first when given (SEISM reads them back from its ``%f``
    text files)."""
    f = _f1(*_rates(counts))
    return int((f if decimals is None else np.round(f, decimals)).argmax())


def seism_rates(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of pooled ``[4, T]`` counts as SEISM's ``gather_measure.m`` (lines
    72-81) sets them: (1, 0) without ground truth and matches, (0, 1) without predictions and
    matches, the ratios where both denominators and the matches are non-zero, else (0, 0)."""
    matched_r, n_gt, matched_p, n_pred = counts.astype(np.float64)
    recall, precision = np.zeros_like(n_gt), np.zeros_like(n_gt)
    no_gt = (n_gt == 0) & (matched_p == 0)
    recall[no_gt], precision[no_gt] = 1.0, 0.0
    no_pred = (n_pred == 0) & (matched_r == 0)
    recall[no_pred], precision[no_pred] = 0.0, 1.0
    both = (n_pred != 0) & (matched_r != 0)
    recall[both], precision[both] = matched_r[both] / n_gt[both], matched_p[both] / n_pred[both]
    return recall, precision


def seism_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """SEISM's ``general_ap.m``, the AP that the benchmark's ``eval_edge.py`` writes: the
    precision interpolated linearly in recall at ``0:0.01:1`` inside the recall range, summed
    and divided by 100. Repeated recall values keep their first threshold's point (MATLAB's
    ``unique``, R2013a and later); 0 with fewer than two distinct recall values."""
    values, first = np.unique(recall, return_index=True)
    if len(values) < 2:
        return 0.0
    grid = np.arange(101) / 100.0
    inside = (grid >= values[0]) & (grid <= values[-1])
    return float(np.interp(grid[inside], values, precision[first]).sum() / 100.0)


def interpolated_best(thresholds: np.ndarray, recall: np.ndarray,
                      precision: np.ndarray) -> tuple[float, float, float, float]:
    """BSDS's ``findBestRPF``: the best F over 100 points of the straight segment between
    each pair of neighbouring thresholds' (R, P); returns (F, threshold, P, R)."""
    if len(thresholds) == 1:
        return (float(_f1(precision, recall)[0]), float(thresholds[0]), float(precision[0]),
                float(recall[0]))
    a = np.linspace(0.0, 1.0, 100)[None, :]
    r = a * recall[1:, None] + (1 - a) * recall[:-1, None]
    p = a * precision[1:, None] + (1 - a) * precision[:-1, None]
    t = a * thresholds[1:, None] + (1 - a) * thresholds[:-1, None]
    f = _f1(p, r)
    k = np.unravel_index(int(f.argmax()), f.shape)  # first maximum, as the strict > of BSDS
    return float(f[k]), float(t[k]), float(p[k]), float(r[k])


EDGE_PROTOCOLS = ("bsds", "seism")


@METRICS.register("edge")
class EdgeMetric(Metric):
    """Edge detection as the BSDS benchmark scores it, the protocol of the multi-task
    PASCAL-Context benchmark (SEISM, ``maxDist = 0.0075``): ``odsf``, ``oisf`` and ``ap``.

    Thresholds ``k / (n + 1)``, ``k = 1..n`` with ``n = num_thresholds = 99``, and the
    prediction is an edge where ``pb >= t``; ``levels=255`` reads ``pb`` as the benchmark does,
    from the 8-bit PNG it saved (``floor(255 p) / 255``). Each image is evaluated at its own
    size: the bounding box of its labelled pixels (0/1 targets; the padding is cropped away),
    so the tolerance ``max_dist`` times the image diagonal means what it means in BSDS.
    Unlabelled pixels inside the box are no edge in the label and none in the prediction.
    Per threshold the thresholded map is thinned and matched one to one with the label
    (:mod:`mtpsl.metrics.bsds`); the counts are summed over images. ``oisf`` is the F of the
    counts summed at each image's own best threshold; ``ap`` is SEISM's (:func:`seism_ap`, the
    one the benchmark's ``eval_edge.py`` writes beside odsF and oisF). ``protocol`` picks the
    odsF: ``bsds`` (default) BSDS's interpolated best F of the pooled recall and precision
    (``findBestRPF``); ``seism`` the benchmark's, the best F over the thresholds themselves
    (SEISM's ``general_ods.m``), with each image's own best threshold for oisF picked from F
    values rounded to 6 decimals as SEISM reads them back (``general_ois.m``).

    Cost: host-side (numpy/scipy), about ``num_thresholds`` thinnings and matchings per image
    (seconds for a 512 x 512 image, see the README); ``workers > 0`` scores images in that
    many processes while evaluation goes on (the sums do not depend on their order).
    ``EdgeTask(measure="dilation")`` switches to the fast approximation for monitoring.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {"odsf": True, "oisf": True, "ap": True}

    def __init__(
        self, max_dist: float = 0.0075, num_thresholds: int = 99, levels: int | None = 255,
        workers: int = 0, device: torch.device | str | None = None, protocol: str = "bsds",
    ) -> None:
        if protocol not in EDGE_PROTOCOLS:
            raise ValueError(f"protocol must be one of {EDGE_PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        if not max_dist > 0:
            raise ValueError(f"max_dist must be > 0, got {max_dist!r}")
        if num_thresholds < 1:
            raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds!r}")
        if levels is not None and levels < 1:
            raise ValueError(f"levels must be >= 1 or None, got {levels!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers!r}")
        self.workers = int(workers)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future[np.ndarray]] = deque()
        self.max_dist = float(max_dist)
        self.thresholds = np.arange(1, num_thresholds + 1) / (num_thresholds + 1)
        self.levels = levels
        self.best: dict[str, float] = {}
        """After ``compute``: the ODS threshold and its precision and recall."""
        super().__init__(device)

    def _new_state(self, device: torch.device, float_dtype: torch.dtype) -> dict[str, Tensor]:
        n = len(self.thresholds)
        return {"counts": torch.zeros(4, n, dtype=torch.int64, device=device),
                "at_best": torch.zeros(4, dtype=torch.int64, device=device)}

    def _images(self, pred: Tensor, target: Tensor):
        """Per image with a labelled pixel: (box, probabilities, label), cropped to the box."""
        _check_dense_pair("edge", pred, target, 1)
        probs = pred.detach()[:, 0].to(torch.float64).cpu().numpy()
        labels = target[:, 0].detach().to(torch.float64).cpu().numpy()
        valids = _binary_valid(target[:, 0].detach()).cpu().numpy()
        for prob, label, valid in zip(probs, labels, valids, strict=True):
            rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
            if rows.size == 0:
                continue
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            prob, valid, label = prob[box], valid[box], label[box]
            if self.levels is not None:
                # uint8(255 p) of the saved PNG, read back as double(png) / 255
                prob = np.floor(prob.astype(np.float32) * self.levels).astype(np.float64)
                prob = prob / self.levels
            yield box, np.where(valid, prob, -np.inf), valid & (label == 1)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self._follow(pred, target)
        for _, prob, gt in self._images(pred, target):
            if not self.workers:
                self._add(boundary_counts(prob, gt, self.thresholds, self.max_dist))
                continue
            if self._pool is None:  # spawn: a forked copy of a training process is unsafe
                self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
            self._pending.append(self._pool.submit(
                boundary_counts, prob, gt, self.thresholds, self.max_dist))
            while len(self._pending) > 2 * self.workers:  # bounded memory: wait for the oldest
                self._add(self._pending.popleft().result())

    def _add(self, counts: np.ndarray) -> None:
        best = _own_best(counts, 6 if self.protocol == "seism" else None)
        self._state["counts"] += torch.from_numpy(counts).to(self._device)
        self._state["at_best"] += torch.from_numpy(counts[:, best]).to(self._device)

    def state_tensors(self) -> list[Tensor]:
        self._drain()
        return super().state_tensors()

    def _drain(self) -> None:
        """Collect every image still being scored by the worker processes."""
        while self._pending:
            self._add(self._pending.popleft().result())

    def compute(self) -> dict[str, float]:
        self._drain()
        state = {k: v.numpy() for k, v in self._host().items()}
        if state["counts"][3].sum() + state["counts"][1].sum() == 0:
            return dict.fromkeys(self.higher_is_better, math.nan)
        recall, precision = _rates(state["counts"])
        if self.protocol == "seism":
            f = _f1(precision, recall)
            k = int(f.argmax())
            ods, threshold, p, r = (float(f[k]), float(self.thresholds[k]), float(precision[k]),
                                    float(recall[k]))
        else:
            ods, threshold, p, r = interpolated_best(self.thresholds, recall, precision)
        self.best = {"threshold": threshold, "precision": p, "recall": r}
        return {"odsf": ods, "oisf": float(_f1(*_rates(state["at_best"]))),
                "ap": seism_ap(*seism_rates(state["counts"]))}

    def best_map(self, pred: Tensor, target: Tensor) -> np.ndarray:
        """The thinned 0/1 map of one image (``[1, 1, H, W]``) at the threshold where it
        alone scores best (0.5 where no threshold scores above 0), full size: the map its
        oisF is taken at, for figures."""
        out = np.zeros(pred.shape[-2:], dtype=np.float32)
        for box, prob, gt in self._images(pred, target):
            counts = boundary_counts(prob, gt, self.thresholds, self.max_dist)
            best = _own_best(counts, 6 if self.protocol == "seism" else None)
            cut = self.thresholds[best] if _f1(*_rates(counts[:, best])) > 0 else 0.5
            out[box] = thin((prob >= cut)[None])[0]
        return out

    def reset(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending = deque()
        super().reset()
        self.best = {}

    def close(self) -> None:
        """Shut the worker processes down (they also end with the interpreter)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None, "_pending": deque()}
