"""``edge``: optimal-dataset-scale F-measure of edge maps with a distance tolerance."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    METRICS,
    Metric,
    _binary_bins,
    _count_into,
    _f_measure,
    _suffix_sums,
)


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
