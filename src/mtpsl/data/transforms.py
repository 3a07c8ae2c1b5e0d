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
:class:`RandomResizeCrop` (the PASCAL-Context protocol's scale range + fixed-size crop)
records ``"crop"`` as ``[B,5]`` = (scale, top, left, content height, content width) instead,
which :func:`replay` reads as described there.
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


def _crop_each(sample: Sample, keys: list[str],
               crop: Callable[[Sample], tuple[tuple, Sample]], columns: int) -> Sample:
    """``crop`` applied to each sample of the batch in turn (its draws in batch order): the
    cropped batch, with each sample's geometry in ``crop`` (float64, so that replay recovers
    the exact Python scale: ``int(H / s)`` must match) and no flip yet."""
    pieces: list[Sample] = []
    drawn: list[tuple] = []
    for b in range(sample["image"].shape[0]):
        geometry, piece = crop({k: sample[k][b : b + 1] for k in keys})
        drawn.append(geometry)
        pieces.append(piece)
    out = dict(sample)
    for k in keys:
        out[k] = torch.cat([p[k] for p in pieces], dim=0)
    device = sample["image"].device
    out["crop"] = torch.tensor(drawn, dtype=torch.float64, device=device).view(-1, columns)
    out["flip"] = torch.zeros(len(drawn), dtype=torch.bool, device=device)
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
        height, width = sample["image"].shape[-2:]

        def crop(one: Sample) -> tuple[tuple, Sample]:
            s, top, left = self.draw(height, width, generator)
            return (s, top, left), scale_crop_one(
                one, tasks, s, top, left, renormalize_normals=self.renormalize_normals)

        return _crop_each(sample, _keys(sample, tasks), crop, columns=3)


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


def content_extent(
    sample: Mapping[str, Tensor], tasks: Mapping[str, Task]
) -> tuple[int, int]:
    """(height, width) of one sample (``[1,C,H,W]`` / ``[1,H,W]`` tensors) without its
    trailing padding: the bottom rows and right columns where the image is 0 and every label
    blank, which is what :func:`fit_to_size` (and :class:`RandomResizeCrop`) add.

    Why: PASCAL-Context items arrive padded to one size; the protocol's scale and crop act on
    the picture itself, so a crop must not land in padding the reference never had.
    """
    carries = sample["image"][0].ne(0).any(dim=0)
    for name, task in tasks.items():
        if name in sample:
            target = sample[name][0]
            differs = target.ne(task.blank_like(target))
            carries |= differs.any(dim=0) if task.label_dims else differs
    rows = torch.nonzero(carries.any(dim=1)).flatten()
    cols = torch.nonzero(carries.any(dim=0)).flatten()
    if rows.numel() == 0:  # nothing at all: treat the whole canvas as content
        return int(carries.shape[0]), int(carries.shape[1])
    return int(rows[-1]) + 1, int(cols[-1]) + 1


def resize_crop_one(
    sample: Mapping[str, Tensor],
    tasks: Mapping[str, Task],
    geometry: Sequence[float],
    size: tuple[int, int],
) -> Sample:
    """Resize one sample's content, crop it and pad it to ``size`` (see
    :class:`RandomResizeCrop`); ``geometry`` = (scale, top, left, content h, content w)."""
    scale, top, left, h, w = (float(geometry[0]), *(int(v) for v in geometry[1:]))
    new = (max(1, int(h * scale)), max(1, int(w * scale)))
    ch, cw = size
    out = dict(sample)

    def move(x: Tensor, mode: str) -> Tensor:
        x = x[..., :h, :w]
        if new != (h, w):
            x = (F.interpolate(x, size=new, mode="bilinear", align_corners=False)
                 if mode == "bilinear" else F.interpolate(x, size=new, mode="nearest"))
        return x[..., top : top + ch, left : left + cw]

    image = move(sample["image"], "bilinear")
    out["image"] = F.pad(image, (0, cw - image.shape[-1], 0, ch - image.shape[-2]))
    for name, task in tasks.items():
        if name not in sample:
            continue
        target = sample[name]
        if task.label_dims == 0:  # class map [1,H,W]: nearest on floats, exact for small ints
            moved = move(target.unsqueeze(1).to(torch.float32), "nearest")
            moved = moved.squeeze(1).to(target.dtype)
        else:
            moved = move(target, "nearest")
        moved = task.on_rescale(moved, scale)
        canvas = task.blank_like(target.new_zeros((*target.shape[:-2], ch, cw)))
        canvas[..., : moved.shape[-2], : moved.shape[-1]] = moved
        out[name] = canvas
    return out


@dataclass
class RandomResizeCrop:
    """Resize by a factor drawn uniformly from ``scale_range``, then a random ``size`` crop,
    padded at the bottom and right where the resized picture is smaller (the ATRC /
    DiffusionMTL PASCAL-Context augmentation: RandomScaling [0.5, 2], RandomCrop 512, PadImage).

    Acts on each sample's content (:func:`content_extent`: earlier padding is dropped first).
    The image is resized bilinearly (half-pixel centres, as OpenCV), every label nearest, as
    in the reference (normals keep unit length; depth is divided by the scale); padded labels
    are blank, the padded image 0 (as :func:`fit_to_size` pads evaluation images). Crop
    offsets are uniform over the positions inside the resized picture (0 where it is
    smaller); ``cat_max_ratio`` redraws (up to 10 times) a crop in which one class covers at
    least that share of the first class map's labelled pixels, as the reference does.
    """

    scale_range: tuple[float, float] = (0.5, 2.0)
    size: tuple[int, int] | None = None
    cat_max_ratio: float | None = None

    def __post_init__(self) -> None:
        low, high = (float(v) for v in self.scale_range)
        if not 0.0 < low <= high:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got "
                             f"{self.scale_range}")
        self.scale_range = (low, high)
        if self.size is not None:
            self.size = (int(self.size[0]), int(self.size[1]))
            if min(self.size) < 1:
                raise ValueError(f"crop size must be positive, got {self.size}")
        if self.cat_max_ratio is not None and not 0.0 < self.cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")

    def draw(self, one: Sample, tasks: Mapping[str, Task], size: tuple[int, int],
             generator: torch.Generator | None) -> tuple[float, int, int, int, int]:
        """One sample's (scale, top, left, content h, content w), drawn in the reference
        order: scale, then top and left (redrawn for ``cat_max_ratio``)."""
        h, w = content_extent(one, tasks)
        low, high = self.scale_range
        scale = low + (high - low) * _uniform(generator)
        new = (max(1, int(h * scale)), max(1, int(w * scale)))

        def offsets() -> tuple[int, int]:
            top = _randint(max(new[0] - size[0], 0) + 1, generator)
            return top, _randint(max(new[1] - size[1], 0) + 1, generator)

        top, left = offsets()
        classes = next((n for n, t in tasks.items() if t.label_dims == 0 and n in one), None)
        if self.cat_max_ratio is not None and self.cat_max_ratio < 1.0 and classes:
            labels = one[classes][:, None, :h, :w].to(torch.float32)
            if new != (h, w):
                labels = F.interpolate(labels, size=new, mode="nearest")
            for _ in range(10):
                window = labels[..., top : top + size[0], left : left + size[1]]
                counts = torch.unique(window[window >= 0], return_counts=True)[1]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = offsets()
        return scale, top, left, h, w

    @_batched
    def __call__(
        self,
        sample: Sample,
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Resize, crop and pad each sample of the batch independently."""
        height, width = sample["image"].shape[-2:]
        size = self.size or (int(height), int(width))

        def crop(one: Sample) -> tuple[tuple, Sample]:
            geometry = self.draw(one, tasks, size, generator)
            return geometry, resize_crop_one(one, tasks, geometry, size)

        return _crop_each(sample, _keys(sample, tasks), crop, columns=5)


@dataclass
class PhotometricJitter:
    """mmseg's PhotoMetricDistortion as the DiffusionMTL / ATRC PASCAL code runs it (no
    channel swap), on images in [0, 1]: each step with probability 1/2, in this order:
    brightness + U(-32, 32)/255; contrast x U(0.5, 1.5), before or after the colour steps
    (a coin); saturation x U(0.5, 1.5) in HSV; hue + randint(-18, 17) of OpenCV's 180 steps.
    Values are clipped to [0, 1] after each step; the reference also rounds to 8 bits
    between steps, which this does not. Only the image's content changes (padding, as found
    by :func:`content_extent`, stays 0); geometry and labels are untouched.
    """

    brightness: float = 32.0 / 255.0
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: int = 18

    @_batched
    def __call__(
        self,
        sample: Sample,
        tasks: Mapping[str, Task],
        generator: torch.Generator | None = None,
    ) -> Sample:
        """Jitter the colours of each image of the batch independently."""
        out = dict(sample)
        images = []
        for b in range(sample["image"].shape[0]):
            one = {k: sample[k][b : b + 1] for k in _keys(sample, tasks)}
            h, w = content_extent(one, tasks)
            image = one["image"].clone()
            image[..., :h, :w] = self.jitter(image[..., :h, :w], generator)
            images.append(image)
        out["image"] = torch.cat(images, dim=0)
        return out

    def jitter(self, image: Tensor, generator: torch.Generator | None) -> Tensor:
        """The reference's draws and steps on one ``[1,3,H,W]`` image in [0, 1]."""

        def coin() -> bool:
            return _uniform(generator) < 0.5

        def between(low: float, high: float) -> float:
            return low + (high - low) * _uniform(generator)

        def contrast(x: Tensor) -> Tensor:
            return (x * between(*self.contrast)).clamp(0.0, 1.0) if coin() else x

        if coin():
            image = (image + between(-self.brightness, self.brightness)).clamp(0.0, 1.0)
        contrast_first = coin()
        if contrast_first:
            image = contrast(image)
        if coin():
            hsv = rgb_to_hsv(image)
            hsv[:, 1] = (hsv[:, 1] * between(*self.saturation)).clamp(0.0, 1.0)
            image = hsv_to_rgb(hsv)
        if coin() and self.hue > 0:
            shift = (_randint(2 * self.hue, generator) - self.hue) / 180.0
            hsv = rgb_to_hsv(image)
            hsv[:, 0] = torch.remainder(hsv[:, 0] + shift, 1.0)
            image = hsv_to_rgb(hsv)
        if not contrast_first:
            image = contrast(image)
        return image


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """``[B,3,H,W]`` RGB in [0, 1] -> HSV, each channel in [0, 1] (hue a fraction of a turn)."""
    high, argmax = rgb.max(dim=1)
    low = rgb.min(dim=1).values
    delta = high - low
    r, g, b = rgb.unbind(dim=1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(argmax == 0, torch.remainder((g - b) / safe, 6.0),
                      torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(high > 0, delta / torch.where(high > 0, high, torch.ones_like(high)),
                      torch.zeros_like(high))
    return torch.stack([hue, sat, high], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`."""
    hue, sat, val = hsv.unbind(dim=1)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=hsv.device).view(1, 3, 1, 1)
                        + hue.unsqueeze(1) * 6.0, 6.0)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return val.unsqueeze(1) - (val * sat).unsqueeze(1) * ramp


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
            if seen_flip and isinstance(t, RandomScaleCrop | RandomResizeCrop):
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
    scale_range: Sequence[float] | None = None,
    crop_size: Sequence[int] | None = None,
    cat_max_ratio: float | None = None,
    photometric: bool = False,
) -> Compose:
    """The reference training augmentation (NYUv2: scale-crop; Cityscapes adds flips).

    With ``scale_range`` or ``crop_size``, the PASCAL-Context protocol's resize + fixed-size
    crop (:class:`RandomResizeCrop`) replaces the zoom (``scales`` must then be ``[1.0]``);
    ``photometric`` jitters colours last, after the flip, as the reference orders them.
    """
    transforms: list[Transform] = []
    if scale_range is not None or crop_size is not None:
        if tuple(scales) != (1.0,):
            raise ValueError(f"scales must be [1.0] with scale_range or crop_size, got {scales}")
        transforms.append(RandomResizeCrop(
            (float(scale_range[0]), float(scale_range[1])) if scale_range else (1.0, 1.0),
            None if crop_size is None else (int(crop_size[0]), int(crop_size[1])),
            cat_max_ratio))
    else:
        transforms.append(RandomScaleCrop(tuple(scales), renormalize_normals=renormalize_normals))
    if flip:
        transforms.append(RandomHorizontalFlip(0.5))
    if photometric:
        transforms.append(PhotometricJitter())
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

    A ``[B,5]`` ``crop`` (from :class:`RandomResizeCrop`) replays that transform instead:
    each map's content (its first h rows and w columns) resized by the scale, cropped at
    (top, left) to the map's size and padded with 0, then flipped as above.
    """
    if pred.ndim != 4:
        raise ValueError(f"replay needs maps [B,C,H,W], got {tuple(pred.shape)}")
    batch = pred.shape[0]
    if crop.ndim != 2 or tuple(crop.shape) not in ((batch, 3), (batch, 5)) or \
            tuple(flip.shape) != (batch,):
        raise ValueError(
            f"crop must be [{batch},3] or [{batch},5] and flip [{batch}], got "
            f"{tuple(crop.shape)} and {tuple(flip.shape)}"
        )
    if crop.shape[1] == 5:
        return _flip_replay(_resize_crop_replay(pred, crop, task), flip, task)
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
    return _flip_replay(torch.cat(pieces, dim=0), flip, task)


def _flip_replay(out: Tensor, flip: Tensor, task: Task | None) -> Tensor:
    flipped = out.flip(-1)
    if task is not None:
        flipped = task.on_hflip(flipped)
    mask = flip.to(device=out.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(mask, flipped, out)


def _resize_crop_replay(pred: Tensor, crop: Tensor, task: Task | None) -> Tensor:
    """:class:`RandomResizeCrop`'s geometry on continuous maps: each map's content resized
    bilinearly (half-pixel centres, as the image), cropped, and padded with 0 (view1's
    padding has no view0 counterpart)."""
    height, width = pred.shape[-2:]
    pieces = []
    for b, (scale, top, left, h, w) in enumerate(crop.tolist()):
        x = pred[b : b + 1, :, : int(h), : int(w)]
        new = (max(1, int(int(h) * scale)), max(1, int(int(w) * scale)))
        if new != (int(h), int(w)):
            x = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
        if task is not None:
            x = task.on_rescale(x, scale)
        x = x[..., int(top) : int(top) + height, int(left) : int(left) + width]
        pieces.append(F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2])))
    return torch.cat(pieces, dim=0)
