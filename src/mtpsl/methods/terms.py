"""Shared pieces of the baselines' cross-task terms: per-image normalisation and the cosine
distance ``L_ct`` of paper 001.

``normalize``: paper 001's Eqs. 2-4 average an image's unlabelled-task terms over the image's
terms (``1/|U_n|``); the official XTC code sums them. ``sum`` (the default, the code's
convention, which every method here shares) adds an image's terms; ``mean`` divides them by
their number (an image without terms adds 0). See docs/fidelity.md.

``distance``: the paper writes the cosine distance ``L_ct(a, b) = 1 - a.b / (|a| |b|)`` for
the mapped maps of Direct-Map and Perceptual-Map; ``task`` uses the target task's own loss
(or its prediction distance), ``cosine`` that distance between the two maps of one image,
each flattened over channels and pixels (invalid label pixels zeroed in both), so it is
defined for one-channel depth too.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.tasks import Task

Normalize = Literal["sum", "mean"]
Distance = Literal["task", "cosine"]


def map_cosine_distance(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """1 - cosine over channels, averaged over positions: ``[N, C, h, w]`` x2 -> ``[N]`` (the
    distance between two joint-space maps: XTC's pair term, JTR's latent distance; ``eps``
    bounds the norms from below, 1e-8 in the XTC code, 1e-12 in JTR's)."""
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=eps).flatten(1).mean(1)


def _cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    return 1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


def cosine_to_label(task: Task, pred: Tensor, target: Tensor) -> Tensor:
    """Per-image ``[B]`` L_ct between a prediction and a label over the label's valid pixels
    (0 for an image without any)."""
    valid = task.valid(target)
    mapped = torch.where(valid.unsqueeze(1), task.as_map(pred), 0.0)
    distance = _cosine_distance(mapped, task.label_map(target).to(mapped.dtype))
    return torch.where(valid.flatten(1).any(1), distance, 0.0)


def cosine_between(task: Task, pred: Tensor, ref: Tensor) -> Tensor:
    """Per-image ``[B]`` L_ct between two predictions (no label: every pixel)."""
    return _cosine_distance(task.as_map(pred), task.as_map(ref))


def to_label(distance: Distance, task: Task, pred: Tensor, target: Tensor) -> Tensor:
    """Per-image ``[B]`` term of a mapped prediction against a label."""
    return task.loss(pred, target) if distance == "task" else cosine_to_label(task, pred, target)


def between(distance: Distance, task: Task, pred: Tensor, ref: Tensor) -> Tensor:
    """Per-image ``[B]`` term of a mapped prediction against another mapped prediction."""
    return task.distance(pred, ref) if distance == "task" else cosine_between(task, pred, ref)


class ImageTerms:
    """An accumulator of per-image terms: their total over the batch under ``normalize``.

    ``sum`` keeps the scalar running sum the methods always used (bit for bit); ``mean`` keeps
    per-image sums and counts and divides each image's sum by its number of terms.
    """

    def __init__(self, n_images: int, like: Tensor, normalize: Normalize) -> None:
        self.normalize = normalize
        self.scalar = like.new_zeros(())
        self.total = like.new_zeros(n_images)
        self.count = like.new_zeros(n_images)

    def add(self, images: Tensor, values: Tensor) -> None:
        """``values[k]`` is one term of image ``images[k]``."""
        if self.normalize == "sum":
            self.scalar = self.scalar + values.sum()
            return
        self.total = self.total.index_add(0, images, values.to(self.total.dtype))
        self.count = self.count.index_add(0, images, torch.ones_like(self.total[images]))

    def reduce(self) -> Tensor:
        """The batch total: the sum of the terms, or of each image's mean term."""
        if self.normalize == "sum":
            return self.scalar
        return (self.total / self.count.clamp(min=1)).sum()


def per_image_mean(total: Tensor, count: Tensor, normalize: Normalize) -> Tensor:
    """Per-image sums ``[B]`` kept (``sum``) or divided by their number of terms (``mean``)."""
    return total if normalize == "sum" else total / count.clamp(min=1)
