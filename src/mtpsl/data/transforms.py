"""Joint, task-aware spatial augmentation on batched tensors.

A transform takes ``{"image": [B,3,H,W], task_name: batch-format target, ...}`` and the task
dict, draws its random parameters per sample from an explicit ``torch.Generator`` (so runs and
the two XTC views are reproducible), and applies the same geometry to the image and to every
target. Tasks say how: ``interpolation`` picks the resampling mode, ``on_rescale`` /
``on_hflip`` fix label *values* (depth shrinks with zoom, normal x flips sign). Working on
batches means the same code runs in a DataLoader (batch of 1) or on GPU batches.

A per-sample dict (image ``[3,H,W]``) is accepted too: a batch dim is added and removed.
Keys that are neither ``"image"`` nor a task name (``"index"``, ``"available"``) pass through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tasks import NormalTask, Task

Sample = dict[str, Tensor]


def _keys(sample: Mapping[str, Tensor], tasks: Mapping[str, Task]) -> list[str]:
    """The spatial keys a transform must move: the image and every task target present."""
    return ["image", *(name for name in tasks if name in sample)]


def _batched(
    fn: Callable[[Sample, Mapping[str, Task], torch.Generator | None], Sample],
) -> Callable[..., Sample]:
    """Let a batch transform also accept one sample (image ``[3,H,W]``)."""

    def wrapper(
        self: object,
        sample: Mapping[str, Tensor],
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        image = sample["image"]
        if image.ndim == 4:
            return fn(self, dict(sample), tasks, generator)  # type: ignore[call-arg]
        if image.ndim != 3:
            raise ValueError(f"image must be [B,3,H,W] or [3,H,W], got {tuple(image.shape)}")
        keys = _keys(sample, tasks)
        batch = dict(sample)
        for k in keys:
            batch[k] = sample[k].unsqueeze(0)
        out = fn(self, batch, tasks, generator)  # type: ignore[call-arg]
        for k in keys:
            out[k] = out[k].squeeze(0)
        return out

    wrapper.__doc__ = fn.__doc__
    return wrapper


def _randint(high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[0, high)`` (a CUDA generator draws on its own device)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(high, (1,), generator=generator, device=device).item())


def _uniform(generator: torch.Generator | None) -> float:
    device = generator.device if generator is not None else "cpu"
    return float(torch.rand((1,), generator=generator, device=device).item())


def _renormalize(normals: Tensor) -> Tensor:
    """L2-normalise non-zero vectors; zero (invalid) pixels stay zero."""
    norm = normals.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, normals / norm.clamp(min=1e-12), normals)


def scale_crop_one(
    sample: Mapping[str, Tensor],
    tasks: Mapping[str, Task],
    scale: float,
    top: int,
    left: int,
    *,
    renormalize_normals: bool = False,
) -> Sample:
    """Crop ``(int(H/scale), int(W/scale))`` at ``(top, left)`` and resize back to ``(H, W)``.

    Works on tensors with a leading batch dim (one geometry for all of them). Exposed so a
    caller can replay a known crop, e.g. to map one XTC view onto another.
    """
    out = dict(sample)
    height, width = sample["image"].shape[-2:]
    h, w = int(height / scale), int(width / scale)
    full = h == height and w == width  # resize to the same size is the identity: skip it

    def resize(x: Tensor, mode: str) -> Tensor:
        x = x[..., top : top + h, left : left + w]
        if full:
            return x
        if mode == "bilinear":
            return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
        return F.interpolate(x, size=(height, width), mode="nearest")

    out["image"] = resize(sample["image"], "bilinear")
    for name, task in tasks.items():
        if name not in sample:
            continue
        target = sample[name]
        if task.label_dims == 0:  # class map [B,H,W]: resample as float, exact for small ints
            moved = resize(target.unsqueeze(1).to(torch.float32), task.interpolation)
            moved = moved.squeeze(1).to(target.dtype)
        else:
            moved = resize(target, task.interpolation)
        moved = task.on_rescale(moved, scale)
        if renormalize_normals and isinstance(task, NormalTask):
            moved = _renormalize(moved)
        out[name] = moved
    return out


@dataclass
class RandomScaleCrop:
    """The reference zoom augmentation: random scale s, crop of size 1/s, resize back.

    Nearest-sampled labels keep their values; depth is divided by s because zooming in by s
    brings the scene s times closer. Normals are resized bilinearly and, as in the reference,
    not re-normalised unless ``renormalize_normals`` is set.
    """

    scales: tuple[float, ...] = (1.0, 1.2, 1.5)
    renormalize_normals: bool = False

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s < 1.0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of values >= 1, got {self.scales}")

    def draw(self, height: int, width: int, generator: torch.Generator | None) -> tuple:
        """One sample's ``(scale, top, left)``, drawn in the reference order."""
        s = self.scales[_randint(len(self.scales), generator)]
        h, w = int(height / s), int(width / s)
        top = _randint(height - h + 1, generator)
        left = _randint(width - w + 1, generator)
        return s, top, left

    @_batched
    def __call__(
        self,
        sample: Sample,
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Apply an independent random scale-crop to each sample of the batch."""
        keys = _keys(sample, tasks)
        height, width = sample["image"].shape[-2:]
        pieces: list[Sample] = []
        for b in range(sample["image"].shape[0]):
            s, top, left = self.draw(height, width, generator)
            one = {k: sample[k][b : b + 1] for k in keys}
            pieces.append(
                scale_crop_one(
                    one, tasks, s, top, left, renormalize_normals=self.renormalize_normals
                )
            )
        out = dict(sample)
        for k in keys:
            out[k] = torch.cat([p[k] for p in pieces], dim=0)
        return out


@dataclass
class RandomHorizontalFlip:
    """Mirror each sample with probability ``p``; tasks fix their values (normal x negates)."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {self.p}")

    @_batched
    def __call__(
        self,
        sample: Sample,
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Flip the chosen samples of the batch (one uniform draw per sample)."""
        batch = sample["image"].shape[0]
        chosen = [_uniform(generator) < self.p for _ in range(batch)]
        out = dict(sample)
        if not any(chosen):
            return out
        mask = torch.tensor(chosen, device=sample["image"].device)
        for name in _keys(sample, tasks):
            x = sample[name]
            flipped = x.flip(-1)
            if name != "image":
                flipped = tasks[name].on_hflip(flipped)
            out[name] = torch.where(mask.view(-1, *([1] * (x.ndim - 1))), flipped, x)
        return out


Transform = Callable[..., Sample]


@dataclass
class Compose:
    """Apply transforms in order, sharing one generator (one reproducible random stream)."""

    transforms: Sequence[Transform] = field(default_factory=list)

    def __call__(
        self,
        sample: Mapping[str, Tensor],
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        out = dict(sample)
        for transform in self.transforms:
            out = transform(out, tasks, generator)
        return out


def build_train_transform(
    scales: Sequence[float] = (1.0, 1.2, 1.5),
    flip: bool = False,
    *,
    renormalize_normals: bool = False,
) -> Compose:
    """The reference training augmentation (NYUv2: scale-crop; Cityscapes adds flips)."""
    transforms: list[Transform] = [
        RandomScaleCrop(tuple(scales), renormalize_normals=renormalize_normals)
    ]
    if flip:
        transforms.append(RandomHorizontalFlip(0.5))
    return Compose(transforms)
