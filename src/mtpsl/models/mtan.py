"""SegNet-MTAN: the Multi-Task Attention Network of Liu, Johns & Davison (CVPR 2019).

The shared SegNet of :mod:`mtpsl.models.segnet` runs unchanged (same blocks, same init); each
task owns a soft-attention branch that reads the shared features at every level:

- encoder level j: mask = att_j([shared first-conv output at j, branch output of level j-1])
  (channel concat; level 0 reads the shared map alone), masked = mask * shared level-j output,
  then a conv_bn_relu *shared by all tasks* (f_j -> f_{j+1}, f_4 -> f_4 at the last level) and
  2x2 max-pooling;
- decoder level j (deepest first): upsample the branch bilinearly (align_corners=True) to the
  shared unpooled map's size, a shared conv_bn_relu (f_j -> f_{j-1}; f_4 -> f_4 at the deepest),
  mask = att([shared unpooled map, that]), masked = mask * shared decoder output at the level.

An attention block is conv1x1-BN-ReLU then conv1x1-BN-Sigmoid. Heads are SegNet's
(conv3x3 f0->f0, conv1x1 f0->C) on each task's last masked decoder map.

Sizes: the reference upsamples by exactly x2, which only fits inputs whose sides are multiples
of 32; we upsample to the recorded shared size instead, identical on those inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.models.base import MODELS, HeadSpec, ModelOutput
from mtpsl.models.segnet import SegNet, conv_bn_relu, init_weights


def attention_block(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """conv1x1-BN-ReLU, conv1x1-BN-Sigmoid: a soft mask in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, kernel_size=1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_out, kernel_size=1),
        nn.BatchNorm2d(c_out),
        nn.Sigmoid(),
    )


class SegNetMTAN(SegNet):
    """SegNet trunk + per-task attention branches; see the module docstring.

    ``features["encoder"]`` is the shared trunk's last pooled map (as SegNet's), so consistency
    methods and their SegNet-shaped mapping networks apply unchanged.
    """

    def __init__(
        self, heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3
    ) -> None:
        super().__init__(heads, width, in_channels)
        f = self.filters
        n = len(f)
        dec_out = [f[0], *f[:-1]]  # decoder level i gives f[i-1] channels (f[0] at level 0)
        dec_to = [*dec_out[:-1], f[-1]]  # the branch's shared conv at decoder level j
        self.encoder_att = nn.ModuleDict(
            {
                task: nn.ModuleList(
                    attention_block(f[0] if j == 0 else 2 * f[j], f[j], f[j]) for j in range(n)
                )
                for task in heads
            }
        )
        self.decoder_att = nn.ModuleDict(
            {
                task: nn.ModuleList(
                    attention_block(f[j] + dec_to[j], dec_out[j], dec_out[j]) for j in range(n)
                )
                for task in heads
            }
        )
        enc_next = [*f[1:], f[-1]]
        self.encoder_block_att = nn.ModuleList(conv_bn_relu(f[j], enc_next[j]) for j in range(n))
        # The branch entering decoder level j has f[j] channels; the deepest level keeps f[4].
        self.decoder_block_att = nn.ModuleList(conv_bn_relu(f[j], dec_to[j]) for j in range(n))
        init_weights(self)

    _TRUNK = ("encoder_block.", "conv_block_enc.", "decoder_block.", "conv_block_dec.")

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared SegNet trunk (encoder then decoder), in forward order. The attention
        branches' shared conv blocks are left out: they are part of every task's branch, not
        of the trunk that GradNorm/MGDA-style weighting reason about."""
        return [p for name, p in self.named_parameters() if name.startswith(self._TRUNK)]

    def forward(self, x: Tensor) -> ModelOutput:
        first, last, sizes, indices = [], [], [], []
        h = x
        for enc, extra in zip(self.encoder_block, self.conv_block_enc, strict=True):
            a = enc(h)
            b = extra(a)
            first.append(a)
            last.append(b)
            sizes.append(b.shape[-2:])
            h, idx = self.pool(b)
            indices.append(idx)
        encoder_feature = h

        unpooled, decoded = {}, {}
        for i in reversed(range(len(self.filters))):
            up = self.unpool(h, indices[i], output_size=sizes[i])
            h = self.conv_block_dec[i](self.decoder_block[i](up))
            unpooled[i], decoded[i] = up, h

        preds = {}
        for task, head in self.heads.items():
            branch = self._attend(task, first, last, unpooled, decoded)
            preds[task] = self.activations[task](head(branch))
        return ModelOutput(preds=preds, features={"encoder": encoder_feature})

    def _attend(
        self,
        task: str,
        first: list[Tensor],
        last: list[Tensor],
        unpooled: dict[int, Tensor],
        decoded: dict[int, Tensor],
    ) -> Tensor:
        enc_att: Any = self.encoder_att[task]  # ModuleLists, one module per level
        dec_att: Any = self.decoder_att[task]
        g = F.max_pool2d(self.encoder_block_att[0](enc_att[0](first[0]) * last[0]), 2, 2)
        for j in range(1, len(self.filters)):
            inp = torch.cat([first[j], g], dim=1)
            g = F.max_pool2d(self.encoder_block_att[j](enc_att[j](inp) * last[j]), 2, 2)
        for j in reversed(range(len(self.filters))):
            g = F.interpolate(g, size=unpooled[j].shape[-2:], mode="bilinear", align_corners=True)
            g = self.decoder_block_att[j](g)
            g = dec_att[j](torch.cat([unpooled[j], g], dim=1)) * decoded[j]
        return g


@MODELS.register("mtan")
def mtan(heads: Mapping[str, HeadSpec], width: float = 1.0, in_channels: int = 3) -> SegNetMTAN:
    """SegNet-MTAN (Liu et al. 2019): a shared SegNet with one soft-attention branch per task."""
    return SegNetMTAN(heads=heads, width=width, in_channels=in_channels)
