"""The metric contract (:class:`Metric`: update / compute / reset / state tensors), the
registry, the shared counting helpers and ``delta_m`` (see the package docstring)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtpsl.core.registry import Registry

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
    f32 = torch.float32  # flags and ids in float32 (bf16 holds ids only to 256)
    index = torch.zeros_like(best, dtype=f32)
    flag, nan = torch.empty_like(best, dtype=f32), torch.empty_like(best, dtype=f32)
    best_nan = torch.ne(best, best, out=torch.empty_like(best, dtype=f32))
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
    contract_task: ClassVar[tuple[str, Mapping[str, Any]] | None] = None
    """The task type (registered name) and task options whose predictions and labels
    ``tests/test_registries.py`` scores with this metric, built with that task's
    ``metric_kwargs()``, to check it against this contract. None: the task type whose
    ``metric`` names this one; set it for a metric no task type names by default (an
    alternative measure, a metric offered to the API only)."""

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


def _binary_valid(target: Tensor) -> Tensor:
    """Where a binary label (0/1) is labelled: ``t == 0`` or ``t == 1``, written without
    slow bool-output comparisons; padding (-1, 255), NaN and anything else are not."""
    return ~(target * (1 - target)).bool()


def _binary_bins(pred: Tensor, target: Tensor, num_bins: int, name: str) -> tuple[Tensor, Tensor]:
    """Check a binary pred/target pair; return (threshold bin ``[B,H,W]``, valid mask).

    The bin of probability p is ``floor(p * num_bins)`` clamped to ``[0, num_bins - 1]``; the
    prediction is positive at threshold ``k / num_bins`` when its bin is >= k.
    """
    _check_dense_pair(name, pred, target, 1)
    valid = _binary_valid(target[:, 0])
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
