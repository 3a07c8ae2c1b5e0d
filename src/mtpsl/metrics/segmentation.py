"""``segmentation``: mIoU and pixel accuracy from a global confusion matrix."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mtpsl.metrics.base import (
    METRICS,
    Metric,
    _count_into,
    _shape,
    argmax_classes,
)

ABSENT_CLASS_RULES = ("skip", "zero")


@METRICS.register("segmentation")
class SegmentationMetric(Metric):
    """mIoU and pixel accuracy from a global confusion matrix.

    ``pred`` is ``[B, C, H, W]`` scores/log-probs (argmax over C) or a ``[B, H, W]`` integer
    class map; ``target`` is ``[B, H, W]`` integer, any value outside ``[0, C)`` (e.g. -1)
    is ignored. A predicted class id outside ``[0, C)`` counts as a miss for its gt class
    (an extra confusion column) rather than being dropped, so it cannot inflate accuracy.
    After ``compute``: ``absent_classes`` (ids with no gt pixel) and ``per_class_iou``.

    ``absent_class`` says how a class absent from both gt and pred enters mIoU: ``skip``
    (default: its IoU is NaN and the mean skips it) or ``zero`` (the multi-task PASCAL-Context
    benchmark's ``eval_semseg.py`` / ``eval_human_parts.py``: ``tp / max(tp + fp + fn, 1e-8)``
    = 0, averaged over every class).
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "miou": True,
        "pixel_acc": True,
        "n_absent_classes": False,
    }

    def __init__(self, num_classes: int, device: torch.device | str | None = None,
                 absent_class: str = "skip") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if absent_class not in ABSENT_CLASS_RULES:
            raise ValueError(f"absent_class must be one of {ABSENT_CLASS_RULES}, "
                             f"got {absent_class!r}")
        self.num_classes = num_classes
        self.absent_class = absent_class
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
        absent = 0.0 if self.absent_class == "zero" else math.nan
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, absent))
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
