"""The conditional joint pairwise task-space mapping of paper 001 (Li, Liu & Bilen, CVPR 2022).

One network maps a task's prediction or label into a joint space shared with another task:
a task-specific input layer (Conv3x3 -> norm -> ReLU) then one shared SegNet-style encoder
(64,64,pool,128,128,pool,256x3,pool,512x3,pool,512x3,pool) whose every layer is
conv -> norm -> FiLM -> ReLU. FiLM's gamma/beta are bias-free linear maps of the one-hot code
of the ordered task pair (s, t): a learned per-pair lookup table, initialised to (1, 0).

Normalisation. The reference runs this network on one image at a time in train mode, so its
BatchNorm normalises each sample with that sample's own statistics. Batching several (image,
pair) inputs through BatchNorm would mix their statistics and change the loss, so the batched
path uses instance normalisation with the same affine parameters (``per_sample_norm``), which
is exactly the batch-1 BatchNorm. ``reference_forward`` keeps the literal batch-1 BatchNorm
form as the test oracle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.models.segnet import init_weights, scaled_filters

#: Layers of the shared encoder per level (filters index into scaled_filters), pool after each.
LEVELS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (2, 3), (3, 3), (4, 3))


def pair_index(s: int, t: int, n_tasks: int) -> int:
    """Position of (s, t) among the off-diagonal entries of a KxK matrix, row-major.

    For K = 3: (0,1)->0, (0,2)->1, (1,0)->2, (1,2)->3, (2,0)->4, (2,1)->5, as the reference
    flattens its pair one-hot.
    """
    if s == t or not (0 <= s < n_tasks and 0 <= t < n_tasks):
        raise ValueError(f"({s}, {t}) is not an ordered pair of distinct tasks of {n_tasks}")
    return s * (n_tasks - 1) + (t if t < s else t - 1)


class SampleNorm(nn.Module):
    """Per-sample normalisation with a BatchNorm-style affine (weight 1, bias 0 at init).

    Holds the same 2C parameters as ``nn.BatchNorm2d`` so parameter counts match the paper.
    """

    is_normalisation: ClassVar[bool] = True
    """Fed fp32 inputs under autocast (:func:`mtpsl.engine.speed.fp32_norms`)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor, batch1_reference: bool = False) -> Tensor:
        if batch1_reference:  # literal reference form: train-mode BatchNorm on one sample
            assert x.shape[0] == 1, "the reference form runs one sample at a time"
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


class FiLM(nn.Module):
    """gamma, beta = W_g a, W_b a for the pair one-hot a (no bias), initialised to 1 and 0."""

    def __init__(self, n_pairs: int, channels: int) -> None:
        super().__init__()
        self.n_pairs = n_pairs
        self.gamma = nn.Linear(n_pairs, channels, bias=False)
        self.beta = nn.Linear(n_pairs, channels, bias=False)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, pairs: Tensor) -> Tensor:
        code = F.one_hot(pairs, self.n_pairs).to(x.dtype)
        gamma = self.gamma(code)[:, :, None, None]
        beta = self.beta(code)[:, :, None, None]
        return x * gamma + beta


class NormFiLM(nn.Module):
    """conv -> per-sample norm -> FiLM (if conditioned); the ReLU is left to the caller."""

    def __init__(self, conv: nn.Conv2d, n_pairs: int | None) -> None:
        super().__init__()
        self.conv = conv
        self.norm = SampleNorm(conv.out_channels)
        self.film = FiLM(n_pairs, conv.out_channels) if n_pairs else None

    def forward(self, x: Tensor, pairs: Tensor, batch1_reference: bool = False) -> Tensor:
        x = self.norm(self.conv(x), batch1_reference)
        return self.film(x, pairs) if self.film is not None else x


class ConvNormFiLM(NormFiLM):
    """3x3 conv -> per-sample norm -> FiLM (if conditioned) -> ReLU: the SegNet-style layer."""

    def __init__(self, c_in: int, c_out: int, n_pairs: int | None) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), n_pairs)

    def forward(self, x: Tensor, pairs: Tensor, batch1_reference: bool = False) -> Tensor:
        return F.relu(super().forward(x, pairs, batch1_reference))


class Mapper(nn.Module):
    """What every joint-space mapping network shares: per-task input layers (``inputs``, each a
    conv + :class:`SampleNorm`), a pair-conditioned ``encode``, and FiLM parameters kept apart
    (they have their own optimiser in paper 001). Subclasses build ``inputs`` and ``encode``."""

    inputs: nn.ModuleDict
    out_channels: int
    """Channels of the joint-space map (the model's encoder feature's)."""

    def encode(self, h: Tensor, pairs: Tensor, batch1_reference: bool = False) -> Tensor:
        raise NotImplementedError

    def film_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() if isinstance(m, FiLM) for p in m.parameters()]

    def other_parameters(self) -> list[nn.Parameter]:
        film = {id(p) for p in self.film_parameters()}
        return [p for p in self.parameters() if id(p) not in film]

    def embed(self, task: str, x: Tensor, batch1_reference: bool = False) -> Tensor:
        """The task-specific input layer (keeps the spatial size)."""
        layer: Any = self.inputs[task]  # a ModuleDict of conv and norm
        x = x.to(layer["conv"].weight.dtype)  # one-hot labels arrive as float32
        return F.relu(layer["norm"](layer["conv"](x), batch1_reference))

    def forward(self, task: str, x: Tensor, pairs: Tensor) -> Tensor:
        return self.encode(self.embed(task, x), pairs)

    def reference_forward(self, task: str, x: Tensor, pair: int) -> Tensor:
        """One sample, literal batch-1 train-mode BatchNorm (the reference's form)."""
        pairs = torch.tensor([pair], device=x.device)
        return self.encode(self.embed(task, x, True), pairs, True)


def init_conv_only(module: nn.Module) -> None:
    """SegNet's xavier init for convolutions; FiLM keeps its (1, 0) identity initialisation."""
    if isinstance(module, nn.Conv2d):
        init_weights(module)


class JointSpaceMapper(Mapper):
    """Maps a task's (encoded) prediction or label into the joint space of a task pair.

    Args:
        in_channels: task name -> channels of its encoded input (``Task.encode_*`` output).
        conditioned: FiLM conditioning on the pair; False is the "w/o cond" ablation (one
            mapping shared by every pair).
        filters: channels of the five levels; the SegNet's, so the output matches its encoder
            feature (``filters[4]`` channels at 1/32 resolution). Default: the paper's.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        conditioned: bool = True,
        filters: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.task_names = tuple(in_channels)
        k = len(self.task_names)
        self.n_pairs = k * (k - 1)
        filters = list(filters or scaled_filters(1.0))
        self.inputs = nn.ModuleDict({
            name: nn.ModuleDict({"conv": nn.Conv2d(c, filters[0], 3, padding=1),
                                 "norm": SampleNorm(filters[0])})
            for name, c in in_channels.items()
        })
        n_pairs = self.n_pairs if conditioned else None
        layers, c_in = [], filters[0]
        for level, n_layers in LEVELS:
            for _ in range(n_layers):
                layers.append(ConvNormFiLM(c_in, filters[level], n_pairs))
                c_in = filters[level]
        self.layers = nn.ModuleList(layers)
        self.pool_after = {sum(n for _, n in LEVELS[: i + 1]) - 1 for i in range(len(LEVELS))}
        self.out_channels = c_in
        self.apply(init_conv_only)

    def encode(self, h: Tensor, pairs: Tensor, batch1_reference: bool = False) -> Tensor:
        """The shared, pair-conditioned encoder: [N, f0, H, W] -> [N, f4, H/32, W/32]."""
        for i, layer in enumerate(self.layers):
            h = layer(h, pairs, batch1_reference)
            if i in self.pool_after:
                h = F.max_pool2d(h, 2, 2)
        return h
