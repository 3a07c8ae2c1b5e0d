"""``graddrop``: gradient sign dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai &
Anguelov, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
NeurIPS 2020).

For every coordinate of the shared parameters' gradient, ``P = (1 + sum_k g_k / sum_k |g_k|) / 2``
measures how positive the tasks agree it is; one uniform ``U`` is drawn per coordinate, and
task ``k``'s component is kept where ``P > U`` and ``g_k > 0`` or ``P < U`` and ``g_k < 0``,
scaled by ``leak + (1 - leak) * kept``. This is torchjd's ``GradDrop`` (the identity as ``f``,
one leak for every task; LibMTL's default leak 0) written again for one reason: torchjd draws
``U`` from the global generator, which would shift the model's dropout and augmentation
streams and break exact resumption; here the draws come from the strategy's own generator,
saved with it. The test checks it against torchjd's object on the same draws.

Applied to the gradients of the shared parameters, as torchjd does; the paper and LibMTL
apply it to the gradient at the shared representation instead (sign-corrected by the
activation), which a strategy does not see here. Partial labels: absent tasks are not rows
of the Jacobian, so the masks are those of GradDrop on the present tasks alone. The draws
are made on the host (one ``[P]`` uniform per step) so their stream does not depend on the
device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from mtpsl.weighting.base import WEIGHTINGS, SeededDraws
from mtpsl.weighting.gradient import JacobianWeighting


class GradDropOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    leak: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of every task's gradient kept whatever the mask (LibMTL's default, 0)."""
    seed: int = 0
    """Seed of the strategy's own generator for the uniform draws."""


@WEIGHTINGS.register("graddrop")
class GradDrop(SeededDraws, JacobianWeighting):
    """GradDrop (Chen et al. 2020): per coordinate keep only the gradients of one sign, the
    sign drawn with the probability of its share of the total magnitude."""

    Options = GradDropOptions
    options: GradDropOptions

    def __init__(self, task_names: Sequence[str], options: BaseModel | None = None) -> None:
        super().__init__(task_names, options)
        self.seed_generator(self.options.seed)

    def aggregate(self, grads: Tensor, losses: Tensor, tasks: Sequence[int]) -> Tensor:
        magnitude = grads.abs().sum(0)
        purity = 0.5 * (1.0 + grads.sum(0) / magnitude.clamp_min(torch.finfo(grads.dtype).tiny))
        draws = torch.rand(purity.shape, generator=self.generator, dtype=grads.dtype)
        draws = draws.to(grads.device)
        kept = ((purity > draws) & (grads > 0)) | ((purity < draws) & (grads < 0))
        leak = self.options.leak
        return ((leak + (1.0 - leak) * kept.to(grads.dtype)) * grads).sum(0)
