"""HiTTs' network (Zhang, Ye, Li, Wang & Xu, ACM MM 2025, "Multi-task label discovery via
hierarchical task tokens"; code ``Evergreen0929/EEMTL`` at ``a2c13c4``, folder ``HiTTs/``,
``models/models.py`` ``MTMSPrompter`` and ``models/prompt_aspp.py``), registered as ``hitts``.

- **Global task tokens**: one learnable vector per task, as wide as the encoder's last map.
- **Multi-scale task-token prompter** (:class:`ScalePrompter` per encoder map): each task's
  token, projected to the map's width, scores every pixel (``sigmoid`` of its dot product
  with a depthwise-scaled feature) and gates the map into a task map; a cross-task affinity
  ``softmax(q k^T / sqrt(C))`` between the tokens (linear queries and keys) mixes the task
  maps and the tokens; a 3x3 conv-BN-ReLU per task follows. Every scale's task maps are
  resized to the finest map, concatenated and fused by a 1x1 conv per task; the scales'
  tokens are projected to the decoder width and summed.
- **Token-conditioned decoder** (:class:`TokenDecoder` per task): DeepLab v3 ASPP (rates 12,
  24, 36 on the stride-4 map, as the code) and a 3x3 conv; then :class:`TokenAttention`
  (feature positions, pooled 2x2 by a depthwise conv, attend jointly with the token; the
  token comes out as the image's fine-grained token) and :class:`TaskPrompt`, which turns
  the fine-grained token into one token per output channel (an MLP over one-hot channel
  embeddings) whose dot products with the feature gate a 1x1 projection (softplus), refined
  by a 3x3 conv. The decoder also returns its feature and the token's pixel score
  (``sigmoid`` of feature . token): the method's feature-level supervision.
- **Depth as classification over bins, normals over cluster centres**: their heads score
  ``depth_bins`` log-spaced depths in ``depth_range`` (the code: 30 in [0.67, 10] for NYUv2,
  50 in [0.01, 0.4922] for Cityscapes) or the normal centres (the code's 40 fixed unit
  vectors, or ``normal_centres=fibonacci``: ``normal_clusters`` spread evenly on the
  sphere); the prediction is the softmax expectation (normals re-normalised) at the
  decoder's resolution, then resized. ``depth_head=direct`` / ``normal_head=direct`` predict
  the values themselves.

Outputs: ``preds`` (activated, input size); ``features["encoder"]`` (the encoder's last map),
``features["hitts/feature/<task>"]`` and ``["hitts/score/<task>"]`` (stride 4) and, for the
bin/cluster heads, ``["hitts/logits/<task>"]`` (input size). Departures from the code (the
tokens are trained, the fine-grained token is per image): ``docs/fidelity.md``, "hitts".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.errors import ConfigError
from mtpsl.models.base import MODELS, FeatureInfo, HeadSpec, ModelOutput, MultiTaskModel, scaled
from mtpsl.models.encoders import EncoderSpec, build_encoder
from mtpsl.models.segnet import init_weights

TOKEN_DIM = 256
"""Decoder width (the code's ``TOKEN_DIM``) at ``width`` 1."""
PROMPT_HIDDEN = 128
"""Hidden width of the per-channel token MLP (``EmbeddedMlp``) at ``width`` 1."""
ASPP_RATES = (12, 24, 36)
NYU_DEPTH_RANGE = (0.67, 10.0)
"""``normal_clusters.py`` 6-7; Cityscapes' is (0.01, 0.4922), lines 9-10."""
NORMAL_CENTRES_CODE = (
    (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
    (-0.30224270992469915, 0.3596195267793291, 0.8827928070937062),
    (-0.40022743627404667, -0.5399836046645756, 0.7404294064574659),
    (0.022914451168333683, 0.657773450048374, 0.752867197013599),
    (0.388221851162994, 0.5872773373662216, 0.7102035787685241),
    (-0.41218628310384486, -0.26366665347590335, 0.872113733331757),
    (0.4427982511715751, -0.005299532848865573, 0.8966056121344426),
    (0.6328446397888406, -0.16028605188281123, 0.757506464304004),
    (-0.790886953762289, 0.17475024887689625, 0.5864811820391765),
    (0.020207875218314464, 0.8204872758282442, 0.5713075108758047),
    (-0.1872304181717187, 0.4871496300782488, 0.8530123143459705),
    (0.16218725867409955, 0.6665071238987552, 0.7276424581592185),
    (0.7767252375613817, -0.04518452197153326, 0.6282167335477615),
    (-0.1595438472978722, -0.3409298226177705, 0.9264516268209629),
    (-0.9771837072803334, 0.0982097585801976, 0.1883264334751841),
    (0.9479137343078693, -0.12469634867837864, 0.29310471326266724),
    (0.2985577089149176, 0.7946746249049556, 0.5285409491984926),
    (0.19384911209971323, -0.698956835783093, 0.6883907781560116),
    (-0.19256422311787602, -0.3489051227534123, 0.9171609647665099),
    (-0.7836012232479178, 0.3448496069581699, 0.5167667476774823),
    (-0.5449384134800668, 0.7061297912393583, 0.452131444867627),
    (0.8910969843437705, 0.32224489133207673, 0.31953778259200605),
    (0.27255029407013176, -0.1909908737371486, 0.9429946040945331),
    (0.9856828295608066, 0.028088001198381455, 0.16625409377721098),
    (-0.14601013207654123, 0.612848762403021, 0.7765934816569584),
    (0.805486433181708, 0.12677440980682775, 0.578895374811667),
    (-0.46411678681582647, 0.26833588968663985, 0.8441513244092153),
    (0.22821713506117303, -0.41802207090093124, 0.8793034103790154),
    (-0.7017919743149696, -0.4283230249509018, 0.5692340565040062),
    (-0.4495196628568735, 0.7908886858515233, 0.415243493985268),
    (-0.4137588056260587, 0.2859680432451282, 0.8643066174740593),
    (-0.7988661025652596, -0.092597484601037, 0.5943388393986656),
    (-0.8114458004493145, -0.5581306204211527, 0.17333759973378685),
    (0.8045514309913752, 0.5861477719279232, 0.09553943873428289),
    (-0.9698588179320603, -0.09539062445107506, 0.22421976283606365),
    (-0.731904769689262, -0.3237003270274866, 0.5996111293066587),
    (-0.2585613698733954, -0.2491424483441185, 0.9333134834782425),
    (0.0, 0.0, -1.0),
)
"""The code's normal centres (``normal_clusters.py`` 12-52): the 3 axes, 36 unit vectors that
its ``gen_random_vector`` (lines 82-91) drew once (unseeded, z >= 0) and pasted in, and
(0, 0, -1). A fixed set, not fitted to data; kept as data so runs can match the code."""


def log_bins(n: int, low: float, high: float) -> Tensor:
    """``n`` depths spaced evenly in log between ``low`` and ``high`` (float64)."""
    return torch.linspace(math.log(low), math.log(high), n, dtype=torch.float64).exp()


def fibonacci_sphere(n: int) -> Tensor:
    """``n`` unit vectors spread evenly over the sphere (the golden-angle spiral)."""
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * k / n
    r = (1.0 - z * z).clamp(min=0.0).sqrt()
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    return torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1)


def centres_on_sphere(kind: str, n: int) -> Tensor:
    """Unit normal centres ``[n, 3]``: the code's table (``n`` must be 40) or a spiral."""
    if kind == "code":
        if n != len(NORMAL_CENTRES_CODE):
            raise ConfigError(f"model.options.normal_clusters: {n}; the code's centres are "
                              f"{len(NORMAL_CENTRES_CODE)} (use normal_centres: fibonacci for "
                              "another number)")
        c = torch.tensor(NORMAL_CENTRES_CODE, dtype=torch.float64)
        return c / c.norm(dim=1, keepdim=True)
    if kind == "fibonacci":
        return fibonacci_sphere(n)
    raise ConfigError(f"model.options.normal_centres: {kind!r}; allowed: code, fibonacci")


def conv_bn_relu(dim: int) -> nn.Sequential:
    """3x3 conv (with bias, as the code) + BatchNorm + ReLU."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ScalePrompter(nn.Module):
    """Task tokens x one encoder map (``TaskTokenPrompt``, reduction 1): token-gated task
    maps, mixed across tasks by the tokens' affinity, then a conv-BN-ReLU per task."""

    def __init__(self, dim: int, n_tasks: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, dim, 1, groups=dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.ffn = nn.ModuleList(conv_bn_relu(dim) for _ in range(n_tasks))
        self.scale = dim ** -0.5

    def forward(self, x: Tensor, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
        """``x`` ``[B, C, H, W]``, ``tokens`` ``[T, C]`` -> T maps ``[B, C, H, W]``, tokens."""
        gates = torch.sigmoid(torch.einsum("bchw,tc->tbhw", self.reduce(x), tokens))
        affinity = (self.query(tokens) @ self.key(tokens).T * self.scale).softmax(dim=-1)
        gated = x.unsqueeze(0) * gates.unsqueeze(2)  # [T, B, C, H, W]
        mixed = torch.einsum("ts,sbchw->tbchw", affinity, gated)
        return [ffn(m) for ffn, m in zip(self.ffn, mixed, strict=True)], affinity @ tokens


class MultiScalePrompter(nn.Module):
    """``MultiscaleTokenPrompt``: a :class:`ScalePrompter` per encoder map, fused per task at
    the finest map (1x1 conv to the last map's width); tokens summed over the scales."""

    def __init__(self, channels: Sequence[int], token_dim: int, n_tasks: int) -> None:
        super().__init__()
        top = channels[-1]
        self.scales = nn.ModuleList(ScalePrompter(c, n_tasks) for c in channels)
        self.project = nn.ModuleList(nn.ModuleList(nn.Linear(top, c) for c in channels)
                                     for _ in range(n_tasks))
        self.restore = nn.ModuleList(nn.ModuleList(nn.Linear(c, token_dim) for c in channels)
                                     for _ in range(n_tasks))
        self.fuse = nn.ModuleList(nn.Conv2d(sum(channels), top, 1) for _ in range(n_tasks))

    def forward(self, maps: Sequence[Tensor], tokens: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per task a fused map ``[B, C_last, H0, W0]``, and tokens ``[T, token_dim]``."""
        size = maps[0].shape[-2:]
        outs: list[tuple[list[Tensor], Tensor]] = []
        for i, (prompter, x) in enumerate(zip(self.scales, maps, strict=True)):
            projected = [_linears(p)[i](t) for p, t in zip(self.project, tokens, strict=True)]
            outs.append(prompter(x, torch.stack(projected)))
        fused: list[Tensor] = []
        out_tokens: list[Tensor] = []
        for t, (fuse, restore) in enumerate(zip(self.fuse, self.restore, strict=True)):
            fused.append(fuse(torch.cat([resize(feats[t], size) for feats, _ in outs], dim=1)))
            restored = [r(toks[t]) for r, (_, toks) in zip(_linears(restore), outs, strict=True)]
            out_tokens.append(torch.stack(restored).sum(dim=0))
        return fused, torch.stack(out_tokens)


def _linears(module: nn.Module) -> nn.ModuleList:
    """A per-task list of per-scale linear layers (typed for mypy)."""
    assert isinstance(module, nn.ModuleList)
    return module


class TokenAttention(nn.Module):
    """Pooled feature positions and the task token attend jointly (``TokenAttention``,
    reduction 2); the feature's update is restored to full size and added, then a
    conv-BN-ReLU; the token's becomes the image's fine-grained token ``[B, D]`` (its mean
    over the batch with ``batch_mean``, as the code)."""

    def __init__(self, dim: int, batch_mean: bool = False) -> None:
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.pool = nn.ModuleList(nn.Conv2d(dim, dim, 2, stride=2, groups=dim, bias=False)
                                  for _ in range(3))
        self.restore_feature = nn.Linear(dim, dim)
        self.restore_token = nn.Linear(dim, dim)
        self.ffn = conv_bn_relu(dim)
        self.scale = dim ** -0.5
        self.batch_mean = batch_mean

    def forward(self, feature: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        b, d, h, w = feature.shape
        tok = token.expand(b, 1, d)
        q, k, v = (lin(torch.cat([pool(feature).flatten(2).transpose(1, 2), tok], dim=1))
                   for lin, pool in zip(self.qkv, self.pool, strict=True))
        x = (q @ k.transpose(1, 2) * self.scale).softmax(dim=-1) @ v  # [B, N + 1, D]
        update = self.restore_feature(x[:, :-1]).transpose(1, 2)
        update = update.reshape(b, d, h // 2, w // 2)
        feature = self.ffn(resize(update, (h, w)) + feature)
        out = self.restore_token(x[:, -1])
        if self.batch_mean:
            out = out.mean(dim=0, keepdim=True).expand(b, d)
        return feature, out


class TaskPrompt(nn.Module):
    """``TaskSepcificPrompt`` (reduction 1) with its ``EmbeddedMlp``: one token per output
    channel from the fine-grained token, gating a 1x1 projection, refined by a 3x3 conv."""

    def __init__(self, dim: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, dim, 1, groups=dim)
        self.embed = nn.Linear(out_channels, dim)
        self.mlp = nn.Sequential(
            nn.Linear(out_channels, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, out_channels))
        self.project = nn.Conv2d(dim, out_channels, 1)
        self.refine = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def channel_tokens(self, token: Tensor) -> Tensor:
        """``[B, D]`` -> ``[B, D, K]``: the token plus each channel's one-hot embedding,
        through the MLP (over the K channel slots, as the code's layout)."""
        onehot = torch.eye(self.embed.in_features, dtype=token.dtype, device=token.device)
        return self.mlp(token.unsqueeze(2) + self.embed(onehot).T.unsqueeze(0))

    def forward(self, feature: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """(logits ``[B, K, H, W]``, pixel score of the token ``[B, 1, H, W]``)."""
        score = torch.sigmoid(torch.einsum("bdhw,bd->bhw", feature, token)).unsqueeze(1)
        gate = torch.einsum("bdhw,bdk->bkhw", self.reduce(feature), self.channel_tokens(token))
        return self.refine(self.project(feature) * F.softplus(gate)), score


class TokenDecoder(nn.Module):
    """``DeepLabHead``: ASPP, 3x3 conv (no bias), :class:`TokenAttention`, :class:`TaskPrompt`."""

    def __init__(self, in_channels: int, out_channels: int, dim: int, hidden: int,
                 rates: Sequence[int], batch_mean: bool) -> None:
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP  # lazy: see encoders/resnet

        self.aspp = ASPP(in_channels, list(rates), dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.attention = TokenAttention(dim, batch_mean)
        self.prompt = TaskPrompt(dim, out_channels, hidden)

    def forward(self, x: Tensor, token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, task feature, its token score), all at ``x``'s resolution."""
        feature, fine = self.attention(self.conv(self.aspp(x)), token)
        logits, score = self.prompt(feature, fine)
        return logits, feature, score


HeadKind = Literal["bins", "clusters", "direct"]


class HiTTsModel(MultiTaskModel):
    """Encoder + global task tokens + multi-scale prompter + token decoders (module doc)."""

    def __init__(self, heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3,
                 backbone: EncoderSpec | None = None, *, token_dim: int = TOKEN_DIM,
                 aspp_rates: Sequence[int] = ASPP_RATES,
                 depth_head: Literal["bins", "direct"] = "bins", depth_bins: int = 30,
                 depth_range: Sequence[float] = NYU_DEPTH_RANGE,
                 normal_head: Literal["clusters", "direct"] = "clusters",
                 normal_centres: str = "code", normal_clusters: int = 40,
                 tokens: Literal["learned", "fixed"] = "learned",
                 token_batch_mean: bool = False) -> None:
        super().__init__()
        if not heads:
            raise ValueError("HiTTsModel needs at least one head")
        _check_options(depth_head, depth_bins, depth_range, normal_head, tokens, aspp_rates)
        self.trunk = build_encoder(backbone or EncoderSpec(depth=18, output_stride=32),
                                   in_channels)
        channels = self.trunk.channels
        dim, hidden = scaled(token_dim, width), scaled(PROMPT_HIDDEN, width)
        names = list(heads)
        initial = torch.randn(len(names), channels[-1])
        if tokens == "learned":
            self.tokens = nn.Parameter(initial)
        else:  # the code's: `nn.Parameter(...).cuda()` is no parameter, never trained
            self.register_buffer("tokens", initial)
        self.prompter = MultiScalePrompter(channels, dim, len(names))
        self.kinds: dict[str, HeadKind] = {}
        codebooks: dict[str, Tensor] = {}
        for name, spec in heads.items():
            if spec.kind == "depth" and depth_head == "bins" and spec.channels == 1:
                self.kinds[name] = "bins"
                codebooks[name] = log_bins(depth_bins, *depth_range).view(-1, 1)
            elif spec.kind == "normal" and normal_head == "clusters" and spec.channels == 3:
                self.kinds[name] = "clusters"
                codebooks[name] = centres_on_sphere(normal_centres, normal_clusters)
            else:
                self.kinds[name] = "direct"
        for name, book in codebooks.items():  # [K, C]; float64 values, cast with the model
            self.register_buffer(f"codebook_{name}", book.float())
        self.decoders = nn.ModuleDict({
            name: TokenDecoder(channels[-1], len(codebooks[name]) if name in codebooks
                               else spec.channels, dim, hidden, aspp_rates, token_batch_mean)
            for name, spec in heads.items()})
        # the code's initialisation of everything but the encoder (MTAN's, as SegNet's)
        init_weights(self.prompter)
        init_weights(self.decoders)
        self.activations = {name: spec.activation for name, spec in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.decoders.keys())

    @property
    def encoder_info(self) -> FeatureInfo:
        trunk = self.trunk
        return FeatureInfo(trunk.channels[-1], trunk.reductions[-1], trunk.feature_size)

    def codebook(self, name: str) -> Tensor | None:
        """The bin depths ``[K, 1]`` or normal centres ``[K, 3]`` of a task's head, None for
        a direct head."""
        return getattr(self, f"codebook_{name}") if self.kinds[name] != "direct" else None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder, the global tokens (when learned) and the prompter's cross-task parts
        (pixel gates' scaling, affinity queries and keys), in forward order."""
        tokens = [self.tokens] if isinstance(self.tokens, nn.Parameter) else []
        cross = [p for s in self.prompter.scales if isinstance(s, ScalePrompter)
                 for m in (s.reduce, s.query, s.key) for p in m.parameters()]
        return [*self.trunk.parameters(), *tokens, *cross]

    def decode(self, name: str, logits: Tensor) -> Tensor:
        """A head's output at the decoder's resolution: the softmax expectation over the bins
        or centres (normals re-normalised), or the logits of a direct head."""
        book = self.codebook(name)
        if book is None:
            return logits
        value = torch.einsum("bkhw,kc->bchw", logits.softmax(dim=1), book.to(logits.dtype))
        return F.normalize(value, dim=1, eps=1e-12) if self.kinds[name] == "clusters" else value

    def forward(self, x: Tensor) -> ModelOutput:
        maps = self.trunk(x)
        fused, tokens = self.prompter(maps, self.tokens.to(maps[-1].dtype))
        size = x.shape[-2:]
        preds: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {"encoder": maps[-1]}
        for (name, decoder), feat, token in zip(self.decoders.items(), fused, tokens,
                                                strict=True):
            logits, feature, score = decoder(feat, token)
            preds[name] = self.activations[name](resize(self.decode(name, logits), size))
            features[f"hitts/feature/{name}"] = feature
            features[f"hitts/score/{name}"] = score
            if self.kinds[name] != "direct":
                features[f"hitts/logits/{name}"] = resize(logits, size)
        return ModelOutput(preds, features)


def _check_options(depth_head: str, bins: int, depth_range: Sequence[float], normal_head: str,
                   tokens: str, rates: Sequence[int]) -> None:
    if depth_head not in ("bins", "direct"):
        raise ConfigError(f"model.options.depth_head: {depth_head!r}; allowed: bins, direct")
    if normal_head not in ("clusters", "direct"):
        raise ConfigError(f"model.options.normal_head: {normal_head!r}; allowed: clusters, "
                          "direct")
    if tokens not in ("learned", "fixed"):
        raise ConfigError(f"model.options.tokens: {tokens!r}; allowed: learned, fixed")
    if not isinstance(bins, int) or bins < 2:
        raise ConfigError(f"model.options.depth_bins: {bins!r}; allowed: an integer >= 2")
    if (len(depth_range) != 2 or not all(isinstance(v, (int, float)) for v in depth_range)
            or not 0 < depth_range[0] < depth_range[1]):
        raise ConfigError(f"model.options.depth_range: {list(depth_range)!r}; allowed: "
                          "[low, high] with 0 < low < high")
    if len(rates) != 3 or not all(isinstance(r, int) and r > 0 for r in rates):
        raise ConfigError(f"model.options.aspp_rates: {list(rates)!r}; allowed: three "
                          "positive integers")


@MODELS.register("hitts")
def hitts(heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3,
          backbone: EncoderSpec | None = None, *, token_dim: int = TOKEN_DIM,
          aspp_rates: Sequence[int] = ASPP_RATES,
          depth_head: Literal["bins", "direct"] = "bins", depth_bins: int = 30,
          depth_range: Sequence[float] = NYU_DEPTH_RANGE,
          normal_head: Literal["clusters", "direct"] = "clusters",
          normal_centres: str = "code", normal_clusters: int = 40,
          tokens: Literal["learned", "fixed"] = "learned",
          token_batch_mean: bool = False) -> HiTTsModel:
    """HiTTs (ACM MM 2025): global task tokens, a multi-scale task-token prompter and
    token-conditioned DeepLab decoders; depth over log bins, normals over cluster centres.

    Keyword-only arguments are ``model.options``: token_dim (256), aspp_rates (12, 24, 36),
    depth_head (bins | direct), depth_bins (30; Cityscapes' code: 50), depth_range ([0.67,
    10]; Cityscapes: [0.01, 0.4922]), normal_head (clusters | direct), normal_centres (code |
    fibonacci), normal_clusters (40), tokens (learned | fixed: the code's untrained random
    tokens), token_batch_mean (false; true: the code's batch-averaged fine-grained token)."""
    return HiTTsModel(heads, width, in_channels, backbone, token_dim=token_dim,
                      aspp_rates=aspp_rates, depth_head=depth_head, depth_bins=depth_bins,
                      depth_range=depth_range, normal_head=normal_head,
                      normal_centres=normal_centres, normal_clusters=normal_clusters,
                      tokens=tokens, token_batch_mean=token_batch_mean)
