"""Joint, task-aware spatial augmentation on batched tensors.

A transform takes ``{"image": [B,3,H,W], task_name: batch-format target, ...}`` and the task
dict, draws its random parameters per sample from an explicit ``torch.Generator`` (so runs and
the two XTC views are reproducible), and applies the same geometry to the image and to every
target. Tasks say how: ``interpolation`` picks the resampling mode, ``on_rescale`` /
``on_hflip`` fix label *values* (depth shrinks with zoom, normal x flips sign). Working on
batches means the same code runs in a DataLoader (batch of 1) or on GPU batches.

A per-sample dict (image ``[3,H,W]``) is accepted too: a batch dim is added and removed.
Keys that are neither ``"image"`` nor a task name (``"index"``, ``"available"``) pass through.

Recorded parameters. Every call also records what it applied, per sample, so the geometry can
be replayed on other maps (:func:`replay`): ``"crop"`` float64 ``[B,3]`` = (scale, top, left)
and ``"flip"`` bool ``[B]``. The pair always means "scale-crop, then flip". A later call
overwrites them, so for ``view1 = T(view0)`` they describe the map from view0 to view1.
:class:`Compose` starts each call from the identity (scale 1, top 0, left 0, no flip), so a
Compose without a scale-crop records the identity crop and one without a flip records
``flip=False``. A bare :class:`RandomScaleCrop` records ``flip=False`` (it does not flip); a
bare :class:`RandomHorizontalFlip` records an identity crop only when the sample has none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtpsl.tasks import Task

Sample = dict[str, Tensor]

#: Per-sample keys in which transforms record the parameters they applied.
META_KEYS: tuple[str, ...] = ("crop", "flip")


def _keys(sample: Mapping[str, Tensor], tasks: Mapping[str, Task]) -> list[str]:
    """The spatial keys a transform must move: the image and every task target present."""
    return ["image", *(name for name in tasks if name in sample)]


def identity_meta(batch: int, device: torch.device | str = "cpu") -> Sample:
    """The record of "no geometry": scale 1, top 0, left 0, no flip, for ``batch`` samples."""
    crop = torch.zeros(batch, 3, dtype=torch.float64, device=device)
    crop[:, 0] = 1.0
    return {"crop": crop, "flip": torch.zeros(batch, dtype=torch.bool, device=device)}


def _batched(
    fn: Callable[[Any, Sample, Mapping[str, Task], torch.Generator | None], Sample],
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
            return fn(self, dict(sample), tasks, generator)
        if image.ndim != 3:
            raise ValueError(f"image must be [B,3,H,W] or [3,H,W], got {tuple(image.shape)}")
        keys = _keys(sample, tasks)
        batch = dict(sample)
        for k in [*keys, *(m for m in META_KEYS if m in sample)]:
            batch[k] = sample[k].unsqueeze(0)
        out = fn(self, batch, tasks, generator)
        for k in [*keys, *(m for m in META_KEYS if m in out)]:
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
        if renormalize_normals:
            moved = task.after_interpolation(moved)
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
        drawn: list[tuple[float, int, int]] = []
        for b in range(sample["image"].shape[0]):
            s, top, left = self.draw(height, width, generator)
            drawn.append((s, top, left))
            one = {k: sample[k][b : b + 1] for k in keys}
            pieces.append(
                scale_crop_one(
                    one, tasks, s, top, left, renormalize_normals=self.renormalize_normals
                )
            )
        out = dict(sample)
        for k in keys:
            out[k] = torch.cat([p[k] for p in pieces], dim=0)
        device = sample["image"].device
        # float64 so that replay recovers the exact Python scale (int(H / s) must match).
        out["crop"] = torch.tensor(drawn, dtype=torch.float64, device=device).view(-1, 3)
        out["flip"] = torch.zeros(len(drawn), dtype=torch.bool, device=device)
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
        device = sample["image"].device
        out = dict(sample)
        mask = torch.tensor(chosen, dtype=torch.bool, device=device).view(batch)
        out["flip"] = mask
        if "crop" not in out:
            out["crop"] = identity_meta(batch, device)["crop"]
        if not any(chosen):
            return out
        for name in _keys(sample, tasks):
            x = sample[name]
            flipped = x.flip(-1)
            if name != "image":
                flipped = tasks[name].on_hflip(flipped)
            out[name] = torch.where(mask.view(-1, *([1] * (x.ndim - 1))), flipped, x)
        return out


def fit_to_size(
    sample: Mapping[str, Tensor], tasks: Mapping[str, Task], size: tuple[int, int]
) -> Sample:
    """Bring one sample (image ``[3,H,W]``) to exactly ``size`` = (height, width).

    Why: datasets whose images differ in size (PASCAL-Context) must batch, and evaluation
    must see every pixel at its own resolution. An image that fits is padded at the bottom
    and right: the image with zeros, every label with its task's blank value (ignored by
    losses and metrics), so the padding is never scored. A larger image is first shrunk,
    aspect kept, to fit (labels with their task's interpolation, normals re-normalised).
    """
    out = dict(sample)
    height, width = sample["image"].shape[-2:]
    th, tw = int(size[0]), int(size[1])
    factor = min(th / height, tw / width)
    if factor < 1.0:
        new = (max(1, int(height * factor)), max(1, int(width * factor)))
        out["image"] = F.interpolate(
            sample["image"][None], size=new, mode="bilinear", align_corners=False
        )[0].clamp(0.0, 1.0)
        for name in _keys(sample, tasks)[1:]:
            out[name] = _resize_label(sample[name], tasks[name], new)
        height, width = new
    pad = (0, tw - width, 0, th - height)
    out["image"] = F.pad(out["image"], pad, value=0.0)
    for name in _keys(sample, tasks)[1:]:
        target = out[name]
        canvas = tasks[name].blank_like(
            target.new_zeros((*target.shape[:-2], th, tw))
        )
        canvas[..., :height, :width] = target
        out[name] = canvas
    return out


def _resize_label(target: Tensor, task: Task, size: tuple[int, int]) -> Tensor:
    """Resize one per-sample label (class map ``[H,W]`` or ``[C,H,W]``) to ``size``."""
    x = target[None, None] if task.label_dims == 0 else target[None]
    if task.interpolation == "bilinear":
        moved = F.interpolate(x.to(torch.float32), size=size, mode="bilinear",
                              align_corners=False)
    else:
        moved = F.interpolate(x.to(torch.float32), size=size, mode="nearest")
    moved = task.after_interpolation(moved).to(target.dtype)
    return moved[0, 0] if task.label_dims == 0 else moved[0]


Transform = Callable[..., Sample]


@dataclass
class Compose:
    """Apply transforms in order, sharing one generator (one reproducible random stream)."""

    transforms: Sequence[Transform] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen_flip = False
        for t in self.transforms:
            seen_flip |= isinstance(t, RandomHorizontalFlip)
            if seen_flip and isinstance(t, RandomScaleCrop):
                # The record ("crop", "flip") means crop-then-flip; flip-then-crop differs
                # (nearest resampling is not mirror-symmetric), so it could not be replayed.
                raise ValueError("a RandomScaleCrop after a RandomHorizontalFlip is unsupported")

    def __call__(
        self,
        sample: Mapping[str, Tensor],
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Apply the transforms; ``"crop"``/``"flip"`` then describe this whole call."""
        out = dict(sample)
        image = sample["image"]
        meta = identity_meta(image.shape[0] if image.ndim == 4 else 1, image.device)
        if image.ndim != 4:
            meta = {k: v.squeeze(0) for k, v in meta.items()}
        out.update(meta)
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


def replay(pred: Tensor, crop: Tensor, flip: Tensor, task: Task | None = None) -> Tensor:
    """Apply recorded per-sample geometry to a batch of maps ``[B,C,H,W]`` (differentiable).

    ``crop`` ``[B,3]`` = (scale, top, left) and ``flip`` ``[B]`` are what a transform recorded
    (see the module docstring): each map is cropped to ``(int(H/s), int(W/s))`` at
    ``(top, left)``, resized back to ``(H, W)``, then mirrored where ``flip`` is set, and the
    task's value fixes follow (``on_rescale``: depth / s; ``on_hflip``: normal x negated;
    ``task=None`` for images: none). So ``replay(pred(view0))`` is what ``pred(view1)`` should
    be when ``view1 = T(view0)`` and the ``crop``/``flip`` recorded by that call are passed.

    Every map is resampled bilinearly with ``align_corners=True``, whatever the task's label
    interpolation: predictions (probabilities, depth, normals) are continuous fields, so
    nearest sampling (which labels need only because class indices and "0 = invalid" depth
    must not be mixed) would throw information and smoothness away; and ``align_corners=True``
    is the grid on which the transform resampled the image, so the replayed map lies on exactly
    view1's pixel positions (``replay`` of view0's image and bilinear labels reproduces view1's
    bit for bit). Normals are not re-normalised, as in the transform's default. Segmentation
    must be passed as per-class maps (probabilities), not as an index map.
    """
    if pred.ndim != 4:
        raise ValueError(f"replay needs maps [B,C,H,W], got {tuple(pred.shape)}")
    batch = pred.shape[0]
    if tuple(crop.shape) != (batch, 3) or tuple(flip.shape) != (batch,):
        raise ValueError(
            f"crop must be [{batch},3] and flip [{batch}], got {tuple(crop.shape)} and "
            f"{tuple(flip.shape)}"
        )
    height, width = pred.shape[-2:]
    pieces = []
    for b, (scale, top_f, left_f) in enumerate(crop.tolist()):
        top, left = int(top_f), int(left_f)
        h, w = int(height / scale), int(width / scale)
        x = pred[b : b + 1, :, top : top + h, left : left + w]
        if not (h == height and w == width):  # as scale_crop_one: same size is the identity
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=True)
        if task is not None:
            x = task.on_rescale(x, scale)
        pieces.append(x)
    out = torch.cat(pieces, dim=0)
    flipped = out.flip(-1)
    if task is not None:
        flipped = task.on_hflip(flipped)
    mask = flip.to(device=out.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, flipped, out)
