"""Streaming evaluation metrics for dense prediction, computed globally over an evaluation set.

Why global: averaging per-batch scores weights a batch of 2 images like a batch of 8 and makes
mIoU depend on the batch size. Every metric here keeps raw counts (int64) and sums (float64;
float32 on devices without float64, such as MPS) on the device that holds the predictions, so
``update`` never calls ``.item()``/``.cpu()`` and never forces a host sync: counting uses
``scatter_add_`` (a sync-free, bincount-equivalent scatter; ``torch.bincount`` on CUDA reads
its input's max back to the host). Per-pixel maths runs in float32 (float64 if the inputs
are), sums accumulate in float64, counts in int64. ``compute`` is the one place values reach
the host, and ``state_tensors`` exposes the accumulators so a DDP trainer can
``all_reduce(SUM)`` them first. One exception: the BSDS edge measure (``edge``) thins and
matches on the host (numpy/scipy) per image, as the published protocol requires; its counts
still live on the device and reduce the same way.

Departures from the papers and reference code, with the options and tests that pin them:
``docs/fidelity.md``, section "Metrics".

Adding a metric is adding a file to this package (see ``docs/extending.md``).
"""

from mtpsl.core.registry import discover
from mtpsl.metrics.base import METRICS, Metric, _float_dtype, argmax_classes, build_metric, delta_m
from mtpsl.metrics.depth import DepthMetric
from mtpsl.metrics.edge import DilationEdgeMetric, EdgeMetric, _disc_max, disc_offsets
from mtpsl.metrics.normal import NORMAL_THRESHOLDS_DEG, NormalMetric
from mtpsl.metrics.saliency import PooledSaliencyMetric, SaliencyMetric
from mtpsl.metrics.segmentation import SegmentationMetric

discover(__name__, __path__)

__all__ = [
    "METRICS",
    "NORMAL_THRESHOLDS_DEG",
    "DepthMetric",
    "DilationEdgeMetric",
    "EdgeMetric",
    "Metric",
    "NormalMetric",
    "PooledSaliencyMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "_disc_max",
    "_float_dtype",
    "argmax_classes",
    "build_metric",
    "delta_m",
    "disc_offsets",
]
