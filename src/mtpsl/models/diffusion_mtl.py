"""The DiffusionMTL network (Ye & Xu, CVPR 2024: the PASCAL "feature diffusion" variant of
its code, ``prismformore/DiffusionMTL`` at ``65b84e7``, ``models/diffusion_net.py`` and
``models/diffusion/mtdnet.py``), registered as ``diffusion_mtl``; the ``diffusion_mtl`` method
(:mod:`mtpsl.methods.diffusion_mtl`) trains it.

- Encoder (``model.backbone``; the paper's: ``depth=18, output_stride=32``, ImageNet weights
  from a local file in ``model.backbone.weights``): its four maps bilinearly resized to half
  the first map's side (stride 8 for a ResNet), concatenated and fused by a 3x3 conv to
  ``embed_dim`` channels (the last map's width, 512 for ResNet-18, times ``width``).
- Per task two ResNet BasicBlocks give the *initial feature* ``f_t`` and a 1x1 conv its
  *intermediate prediction*.
- The condition ``c``: a 3x3 conv of every task's intermediate prediction, detached.
- Per task (:mod:`~mtpsl.models.diffusion_mtl_denoiser`): ``f_t`` noised to the last of
  ``timesteps`` steps of a linear schedule (betas ``beta_start``..``beta_end``), then denoised
  step by step (x0 prediction, DDPM posterior with fresh noise, down to step 0), the
  last step's x0 through the task's 1x1 head; logits resized bilinearly to the input.

Training and evaluation run the same chain: the code samples from noise at evaluation too, so
its predictions are random draws (the noise is small: standard deviation 0.105 at the start,
0.030 at the intermediate step with the defaults). Here evaluation (``model.eval()``) draws
from a generator of its own, seeded with ``eval_seed`` at every forward, so scores repeat and
evaluating does not shift the random stream training draws from (a resumed run stays
bitwise identical whatever the evaluation schedule); ``eval_seed: null`` draws from the global
stream as the code does. ``forward(x)`` refines every
task; ``forward(x, active=...)`` only the (image, task) pairs marked (the method passes the
labels it has, as the code refines the labelled tasks alone), and returns the intermediate
predictions as ``features["inter/<task>"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.base import MODELS, FeatureInfo, HeadSpec, ModelOutput, MultiTaskModel, scaled
from mtpsl.models.diffusion_mtl_denoiser import Denoiser, LinearSchedule
from mtpsl.models.encoders import EncoderSpec, build_encoder

NoiseFn = Callable[[str, str, Tensor | None, Tensor], Tensor]
"""``(task, draw, rows, like) -> standard normal noise shaped like like``: ``draw`` is
``start`` (the forward noising) or ``step<t>`` (the posterior sample at step t), ``rows`` the
batch indices of ``like``'s images (None: all). Tests replace it with fixed noise."""
HIDDEN = 512
"""Hidden width of the denoiser's refinement stack (``mtdnet.py`` 128), times ``width``."""


def gaussian_noise(task: str, draw: str, rows: Tensor | None, like: Tensor) -> Tensor:
    """The code's noise: fresh standard normal draws from the global generator."""
    return torch.randn_like(like)


def seeded_noise(seed: int, device: torch.device) -> NoiseFn:
    """Standard normal draws from a generator of its own, seeded with ``seed``: evaluation
    is repeatable and leaves the global stream, which training draws from, untouched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def draw(task: str, name: str, rows: Tensor | None, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=generator, device=like.device,
                           dtype=like.dtype)

    return draw


class BasicBlock(nn.Module):
    """ResNet's basic block at constant width (``models/resnet.py`` 39-77 of the code,
    torchvision's): conv3x3-BN-ReLU-conv3x3-BN, plus the input, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + x)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DiffusionMTLNet(MultiTaskModel):
    """See the module docstring."""

    def __init__(self, heads: Mapping[str, HeadSpec], width: float = 1.0,
                 in_channels: int = 3, backbone: EncoderSpec | None = None,
                 timesteps: int = 2, beta_start: float = 1e-3, beta_end: float = 1e-2,
                 blocks: int = 4, attn_heads: int = 4, embed_dim: int | None = None,
                 eval_seed: int | None = 0) -> None:
        super().__init__()
        _check_options(timesteps, beta_start, beta_end, blocks, attn_heads, embed_dim)
        if eval_seed is not None and (not isinstance(eval_seed, int) or eval_seed < 0):
            raise ConfigError(f"model.options.eval_seed: expected a non-negative integer or "
                              f"null, got {eval_seed!r}")
        self.eval_seed = eval_seed
        self.trunk = build_encoder(backbone or EncoderSpec(depth=18, output_stride=32),
                                   in_channels)
        dim = embed_dim or scaled(self.trunk.channels[-1], width)
        if dim % attn_heads:
            raise ConfigError(f"model.options.attn_heads: {attn_heads} does not divide the "
                              f"{dim} feature channels (model.options.embed_dim or width)")
        self.embed = nn.Conv2d(sum(self.trunk.channels), dim, 3, padding=1)
        self.inter = nn.ModuleDict({t: nn.Sequential(BasicBlock(dim), BasicBlock(dim))
                                    for t in heads})
        self.inter_heads = nn.ModuleDict({t: nn.Conv2d(dim, h.channels, 1)
                                          for t, h in heads.items()})
        combine = nn.Conv2d(sum(h.channels for h in heads.values()), dim, 3, padding=1)
        nn.init.kaiming_normal_(combine.weight, mode="fan_out", nonlinearity="relu")
        if combine.bias is not None:  # mtdnet.py 198-223
            nn.init.zeros_(combine.bias)
        self.combine = combine
        self.denoiser = Denoiser({t: h.channels for t, h in heads.items()}, dim,
                                 scaled(HIDDEN, width), blocks, attn_heads)
        self.schedule = LinearSchedule(timesteps, beta_start, beta_end)
        self.activations = {t: h.activation for t, h in heads.items()}
        self.out_channels = {t: h.channels for t, h in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.inter_heads.keys())

    @property
    def encoder_info(self) -> FeatureInfo:
        trunk = self.trunk
        return FeatureInfo(trunk.channels[-1], trunk.reductions[-1], trunk.feature_size)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Encoder, fusion, condition conv, timestep embedding and cross-attention blocks."""
        return [*self.trunk.parameters(), *self.embed.parameters(),
                *self.combine.parameters(), *self.denoiser.t_embed.parameters(),
                *self.denoiser.blocks.parameters()]

    def fuse(self, maps: list[Tensor]) -> Tensor:
        """Every encoder map at half the first map's side, fused (``diffusion_net.py`` 38-41)."""
        h, w = maps[0].shape[-2:]
        size = (max(1, h // 2), max(1, w // 2))
        return self.embed(torch.cat([_resize(m, size) for m in maps], dim=1))

    def sample(self, task: str, start: Tensor, cond: Tensor, rows: Tensor | None,
               noise: NoiseFn) -> list[Tensor]:
        """The chain of ``task`` from its initial feature ``start``: the x0 prediction of every
        step, from the last timestep to step 0 (``mtdnet.py`` 415-429 and 437-447)."""
        s, den = self.schedule, self.denoiser
        last = s.steps - 1
        x = s.q_sample(start, noise(task, "start", rows, start), last)
        x0s = []
        for t in range(last, 0, -1):
            x0 = den.predict_x0(task, x, cond, t)
            mean, std = s.posterior(x0, x, t)
            x = mean + std * noise(task, f"step{t}", rows, x)
            x0s.append(x0)
        x0s.append(den.predict_x0(task, x, cond, 0))
        return x0s

    def forward(self, x: Tensor, active: Tensor | None = None, noise: NoiseFn | None = None,
                trace: bool = False) -> ModelOutput:
        """Predictions of every task (``active`` None), or of the pairs where ``active`` (bool
        ``[B, T]``) is set: the others are the activation of zero logits and carry no
        gradient. With ``active`` or in training, ``features["inter/<task>"]`` holds the
        intermediate predictions; ``trace`` adds each task's initial feature
        (``clean/<task>``) and the x0 predictions of its steps (``x0/<task>``,
        ``[B, steps, C, h, w]``, zero where not refined)."""
        size = (x.shape[-2], x.shape[-1])
        if noise is None:
            noise = (gaussian_noise if self.training or self.eval_seed is None
                     else seeded_noise(self.eval_seed, x.device))
        maps = self.trunk(x)
        fused = self.fuse(maps)
        feats = {t: self.inter[t](fused) for t in self.tasks}
        inter = {t: self.inter_heads[t](feats[t]) for t in self.tasks}
        cond = self.combine(torch.cat([v.detach() for v in inter.values()], dim=1))
        preds: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {"encoder": maps[-1]}
        for k, task in enumerate(self.tasks):
            rows = None if active is None else active[:, k].nonzero().flatten()
            logits, x0s = self._refine(task, feats[task], cond, rows, noise)
            preds[task] = self.activations[task](_resize(_scatter(logits, rows, len(x)), size))
            if trace:
                features[f"clean/{task}"] = feats[task]
                features[f"x0/{task}"] = _scatter(torch.stack(x0s, dim=1), rows, len(x))
            if active is not None or self.training:
                features[f"inter/{task}"] = self.activations[task](_resize(inter[task], size))
        return ModelOutput(preds, features)

    def _refine(self, task: str, feat: Tensor, cond: Tensor, rows: Tensor | None,
                noise: NoiseFn) -> tuple[Tensor, list[Tensor]]:
        """Logits at the feature's size and the x0 of every step, for the images ``rows``
        (all if None; zeros when there are none)."""
        if rows is not None:
            feat, cond = feat[rows], cond[rows]
        if len(feat) == 0:
            channels = self.out_channels[task]
            return feat.new_zeros(0, channels, *feat.shape[-2:]), [feat] * self.schedule.steps
        x0s = self.sample(task, feat, cond, rows, noise)
        return self.denoiser.heads[task](x0s[-1]), x0s


def _scatter(part: Tensor, rows: Tensor | None, n: int) -> Tensor:
    """``part`` (the images ``rows``) in a batch of ``n`` zeros; ``part`` itself if all."""
    if rows is None or len(rows) == n:
        return part
    return part.new_zeros(n, *part.shape[1:]).index_copy(0, rows, part)


def _check_options(timesteps: int, beta_start: float, beta_end: float, blocks: int,
                   attn_heads: int, embed_dim: int | None) -> None:
    for key, value in (("timesteps", timesteps), ("blocks", blocks),
                       ("attn_heads", attn_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"model.options.{key}: expected a positive integer, got {value!r}")
    if embed_dim is not None and (not isinstance(embed_dim, int) or embed_dim < 1):
        raise ConfigError(f"model.options.embed_dim: expected a positive integer or null, got "
                          f"{embed_dim!r}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(f"model.options.beta_start, beta_end: need 0 < beta_start <= beta_end "
                          f"< 1, got {beta_start!r}, {beta_end!r}")


@MODELS.register("diffusion_mtl")
def diffusion_mtl(
    heads: Mapping[str, HeadSpec],
    width: float = 1.0,
    in_channels: int = 3,
    backbone: EncoderSpec | None = None,
    *,
    timesteps: int = 2,
    beta_start: float = 1e-3,
    beta_end: float = 1e-2,
    blocks: int = 4,
    attn_heads: int = 4,
    embed_dim: int | None = None,
    eval_seed: int | None = 0,
) -> DiffusionMTLNet:
    """DiffusionMTL (Ye & Xu, CVPR 2024): encoder maps fused at stride 8, initial per-task
    predictions, and a multi-task conditioned denoiser that refines each task's feature
    through a short diffusion chain (train it with ``method.name=diffusion_mtl``).

    Keyword-only arguments are ``model.options``: ``timesteps`` (2), the linear schedule's
    ``beta_start``/``beta_end`` (1e-3, 1e-2), cross-attention ``blocks`` (4) and
    ``attn_heads`` (4), ``embed_dim`` (None: the encoder's last width times ``width``),
    ``eval_seed`` (0: evaluation noise from a generator seeded so at every forward; null: the
    global stream, as the code)."""
    return DiffusionMTLNet(heads, width, in_channels, backbone, timesteps, beta_start,
                           beta_end, blocks, attn_heads, embed_dim, eval_seed)
