"""DiffusionMTL's multi-task denoiser and its noise schedule (Ye & Xu, CVPR 2024; the code
``prismformore/DiffusionMTL`` at ``65b84e7``, ``models/diffusion/mtdnet.py``), used by the
``diffusion_mtl`` network (:mod:`mtpsl.models.diffusion_mtl`).

One denoising step of task ``t`` at timestep ``s`` maps a noisy feature ``x_s`` to a prediction
of the clean feature ``x_0`` (x0-parameterisation):

- ``h = pre_t(x_s) + emb(s)`` (3x3 conv per task, DiT's sinusoidal timestep embedding + MLP);
- tokens: ``h`` and the condition ``c`` (a 3x3 conv of all tasks' detached intermediate
  predictions) bilinearly resized to a quarter of their side, flattened;
- ``blocks`` cross-attention blocks, each updating the condition stream ``q`` from the noisy
  stream ``k`` (``k += MLP(LN(k))``; ``q += Attn(LN(q), LN(k))``; ``q += MLP(LN(q))``): the code
  passes the condition tokens as each block's queries, so the output is the condition stream
  after attending to the noisy feature;
- ``x_0 = refine_t(up(q) + h)`` (1x1 conv, three 3x3 conv-ReLU), and at the last step the
  task's 1x1 head turns it into logits.

Departures and the lines they were checked against: ``docs/fidelity.md``, section
"diffusion_mtl".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FREQUENCY_DIM = 256
"""Size of the sinusoidal timestep code before its MLP (DiT's, ``mtdnet.py`` 27)."""
TOKEN_STRIDE = 4
"""The attention runs on the feature resized to a quarter of its side (``mtdnet.py`` 164-176)."""


@dataclass(frozen=True)
class LinearSchedule:
    """The code's ``linear`` beta schedule (``util.py`` 208-212: linear in sqrt(beta)) and the
    DDPM coefficients it derives (``mtdnet.py`` 248-275), as Python floats (float64): the
    tensors they multiply keep their own dtype."""

    steps: int
    beta_start: float
    beta_end: float

    @property
    def betas(self) -> list[float]:
        a, b = math.sqrt(self.beta_start), math.sqrt(self.beta_end)
        if self.steps == 1:
            return [a * a]
        return [(a + (b - a) * i / (self.steps - 1)) ** 2 for i in range(self.steps)]

    @property
    def alphas_cumprod(self) -> list[float]:
        out, acc = [], 1.0
        for beta in self.betas:
            acc *= 1.0 - beta
            out.append(acc)
        return out

    def q_sample(self, x_start: Tensor, noise: Tensor, t: int) -> Tensor:
        """``sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (``mtdnet.py`` 302-304)."""
        a = self.alphas_cumprod[t]
        return math.sqrt(a) * x_start + math.sqrt(1.0 - a) * noise

    def posterior(self, x0: Tensor, x_t: Tensor, t: int) -> tuple[Tensor, float]:
        """Mean and standard deviation of ``q(x_{t-1} | x_t, x_0)`` (``mtdnet.py`` 266-275,
        312-319; the log-variance clipped at 1e-20 as there)."""
        beta, a = self.betas[t], self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t - 1] if t > 0 else 1.0
        coef1 = beta * math.sqrt(a_prev) / (1.0 - a)
        coef2 = (1.0 - a_prev) * math.sqrt(1.0 - beta) / (1.0 - a)
        variance = beta * (1.0 - a_prev) / (1.0 - a)
        return coef1 * x0 + coef2 * x_t, math.exp(0.5 * math.log(max(variance, 1e-20)))


def timestep_code(t: int, dim: int, like: Tensor, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal code of timestep ``t`` ``[1, dim]`` (cos then sin; ``mtdnet.py`` 36-54),
    in float32 as there (float64 for a float64 ``like``)."""
    half = dim // 2
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype,
                                                           device=like.device) / half)
    args = t * freqs
    code = torch.cat([torch.cos(args), torch.sin(args)])
    if dim % 2:
        code = torch.cat([code, code.new_zeros(1)])
    return code.unsqueeze(0)


class Mlp(nn.Sequential):
    """timm's ``Mlp``: Linear, GELU, Linear (hidden = 4x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttention(nn.Module):
    """Multi-head attention of ``q`` tokens over ``k`` tokens (``mtdnet.py`` 62-89): bias-free
    query and key/value maps, scale ``head_dim ** -0.5``, an output projection with bias."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        b, n, c = q.shape
        query = self.q(q).view(b, n, self.heads, -1).transpose(1, 2)
        key, value = self.kv(k).view(b, k.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(query, key, value)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossBlock(nn.Module):
    """``mtdnet.py`` 91-114 (no dropout, no drop path: the code's are 0)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_kv, self.norm2_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.mlp, self.mlp_kv = Mlp(dim, hidden), Mlp(dim, hidden)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        k = k + self.mlp_kv(self.norm2_kv(k))
        q = q + self.attn(self.norm1(q), self.norm_kv(k))
        return q + self.mlp(self.norm2(q)), k


def _tokens(x: Tensor, size: Sequence[int]) -> Tensor:
    """``x`` bilinearly resized to ``size`` and flattened to ``[B, h w, C]``."""
    small = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return small.flatten(2).transpose(1, 2)


class Denoiser(nn.Module):
    """Per-task input convs, refinement stacks and heads around shared cross-attention blocks
    and a timestep embedding (``mtdnet.py`` 116-196; see the module docstring)."""

    def __init__(self, tasks: dict[str, int], dim: int, hidden: int, blocks: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CrossBlock(dim, heads) for _ in range(blocks)])
        self.pre = nn.ModuleDict({t: nn.Conv2d(dim, dim, 3, padding=1) for t in tasks})
        self.refine = nn.ModuleDict({t: nn.Sequential(
            nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU()) for t in tasks})
        self.heads = nn.ModuleDict({t: nn.Conv2d(dim, c, 1) for t, c in tasks.items()})
        for module in self.modules():  # mtdnet.py 145-155, before the embedding exists
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        first, last = nn.Linear(FREQUENCY_DIM, dim), nn.Linear(dim, dim)
        nn.init.normal_(first.weight, std=0.02)  # mtdnet.py 141-143
        nn.init.normal_(last.weight, std=0.02)
        self.t_embed = nn.Sequential(first, nn.SiLU(), last)

    def predict_x0(self, task: str, x_t: Tensor, cond: Tensor, t: int) -> Tensor:
        """The clean feature predicted from ``x_t`` at timestep ``t`` under ``cond``."""
        emb = self.t_embed(timestep_code(t, FREQUENCY_DIM, x_t))
        h = self.pre[task](x_t) + emb[:, :, None, None]
        size = h.shape[-2:]
        small = (max(1, size[0] // TOKEN_STRIDE), max(1, size[1] // TOKEN_STRIDE))
        q, k = _tokens(cond, small), _tokens(h, small)
        for block in self.blocks:
            q, k = block(q, k)
        q = q.transpose(1, 2).reshape(len(q), -1, *small)
        up = F.interpolate(q, size=tuple(size), mode="bilinear", align_corners=False)
        return self.refine[task](up + h)
