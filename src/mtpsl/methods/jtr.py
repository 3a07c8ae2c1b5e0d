"""JTR: joint-task regularisation (Nishi, Kim, Li & Pfister, CVPR 2024), as its code defines it
(``KentoNishi/JTR-CVPR-2024`` at ``f6a2279``; facts in ``shared/spec/jtr-reference.md``).

Every task's map is encoded and stacked along channels; one joint-task auto-encoder ``g`` (a
SegNet over ``sum_t C_t`` channels, latent = its last pooled map) maps the stacked
predictions ``Y_hat`` and the stacked labels ``Y`` into one latent space. Its cost grows
linearly with the number of tasks (one auto-encoder input), where MTPSL's grows with the
number of task pairs.

Encodings (input space of ``g``): a class-map task (segmentation) as its one-hot label, its
probabilities (soft) or a straight-through hard Gumbel sample (the task's ``encode_pred``); a
continuous task (depth) as ``Phi((d - depth_mean) / depth_std)`` for prediction and label alike
(``Phi`` the normal CDF; the statistics are options, NYUv2's by default, as the code uses them
for every dataset); every other task by its own ``encode_pred`` / ``encode_target`` (normals
``(n + 1) / 2``, binary maps their probabilities). ``M`` is the intersection of the valid-pixel
masks of the tasks labelled for the image; encoded *predictions* are multiplied by ``M``,
labels are not. A labelled task's prediction is detached; a missing label's slot in ``Y`` is
filled from the prediction (the same tensor, or a fresh hard-Gumbel draw for class maps), so
JTR reaches the multi-task model only through the predictions of unlabelled tasks.

Three views (one model pass over all three; ``n_views = 3``): view 0 carries the supervised
losses; views 1 and 2 are independent random zooms of view 0.

- **view 1 trains the model only**: ``d1 = 1 - mean cos(E(Y1), E(Y_hat1))`` (cosine over
  channels, mean over latent positions; ``Y_hat1`` with hard-Gumbel class maps) through ``g``
  with its parameters frozen;
- **view 2 trains the auto-encoder only**: ``Y2`` and ``Y_hat2`` (soft class maps) detached;
  ``d2`` as ``d1``, plus the reconstruction of both inputs, per task its
  ``Task.reconstruction_loss`` over ``M`` (segmentation BCE-with-logits, depth L1 of the
  sigmoid, normals 1 - cos).

Loss per image ``L_SL + dist_weight d1 + ae_dist_weight d2 + recon_weight L_recon``; the code's
weights are 4, 4 x 2 = 8 (its recon weight also scales d2) and 2, the defaults here. The
auto-encoder trains in the main optimiser group, as the code's one Adam does.

Departures from the code, each the right thing where the code is not (none changes what is
being optimised, so none is kept behind an option):

- The code copies the auto-encoder per sample per step (``deepcopy``) and runs every image at
  batch 1. Here one batched pass per view does the work: the auto-encoder's normalisations are
  per sample (SegNet with every BatchNorm replaced by :class:`SampleNorm`, which is what
  train-mode BatchNorm at batch 1 computes), and view 1 freezes the parameters instead of
  copying them. The literal per-sample form is :meth:`JTRLoss.reference_terms` (the test
  oracle: equal in value and gradient in float64).
- Reconstruction targets are the auto-encoder's own inputs: the code transforms the predicted
  depth target twice (``Phi(Phi(d))``), compares ``Y_hat2``'s normals in ``(n + 1) / 2`` but
  ``Y2``'s raw, and draws a fresh hard Gumbel sample as ``Y_hat2``'s segmentation target.
- Normal reconstruction is averaged over pixels (the code counts each of the 3 channels).
- Not reproduced: the code's photometric RandAugment on all views (the views here are the
  geometric zooms of the other methods), and its best-epoch selection on the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, JointMaps, Losses, Method, frozen, supervised_losses
from mtpsl.methods.joint_space import SampleNorm
from mtpsl.methods.terms import map_cosine_distance as latent_distance
from mtpsl.models import HeadSpec, ModelOutput
from mtpsl.models.segnet import SegNet
from mtpsl.tasks import Task

Sampler = Callable[[Task, Tensor], Tensor]
"""A hard sample of a prediction in a task's input space (default: ``task.encode_pred``)."""


class JTROptions(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dist_weight: float = Field(default=4.0, ge=0.0)
    """Weight of d1, the latent distance that trains the model (the code's --dist-mtl-weight)."""
    recon_weight: float = Field(default=2.0, ge=0.0)
    """Weight of the reconstruction term (the code's --recon-weight)."""
    ae_dist_weight: float | None = Field(default=None, ge=0.0)
    """Weight of d2, the latent distance that trains the auto-encoder; None = dist_weight x
    recon_weight (8, the code's)."""
    ae_width: float = Field(default=1.0, gt=0.0)
    """Channel multiplier of the auto-encoder SegNet (1.0 = the code's, 64..512)."""
    depth_mean: float = 2.3618
    """Mean of the depth encoding Phi((d - mean) / std): NYUv2's (the code uses it everywhere)."""
    depth_std: float = Field(default=1.5876, gt=0.0)


def _identity(x: Tensor) -> Tensor:
    return x


def per_sample_autoencoder(in_channels: int, width: float) -> SegNet:
    """A SegNet from ``in_channels`` stacked maps back to as many, every BatchNorm replaced by
    a per-sample normalisation (train-mode BatchNorm of one image, batched)."""
    ae = SegNet({"recon": HeadSpec(in_channels, _identity)}, width, in_channels)
    for module in list(ae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, SampleNorm(child.num_features, child.eps))
    return ae


class JTRLoss(nn.Module):
    """The auto-encoder and the two JTR views' terms (batched and per-sample forms)."""

    def __init__(self, tasks: Mapping[str, Task], options: JTROptions) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.options = options
        self.channels = [t.out_channels for t in self.tasks.values()]
        self.ae = per_sample_autoencoder(sum(self.channels), options.ae_width)

    # -------------------------------------------------------------------- encodings

    def encode(self, task: Task, x: Tensor, kind: str, sample: Sampler) -> Tensor:
        """``x`` in the auto-encoder's input space; ``kind`` is label, soft or hard."""
        if task.continuous:
            o = self.options
            return torch.special.ndtr((x - o.depth_mean) / o.depth_std)
        if kind == "label":
            return task.encode_target(x)
        if kind == "soft" and task.label_dims == 0:
            return task.as_map(x)
        return sample(task, x) if kind == "hard" else task.encode_pred(x)

    def stacks(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               labelled: Tensor, pred_kind: str, sample: Sampler) -> tuple[Tensor, Tensor, Tensor]:
        """``(Y, Y_hat, M)``: stacked labels with their holes filled from the predictions,
        stacked predictions (a labelled task's detached) and the mask ``M`` ``[N, H, W]``."""
        masks = [task.valid(targets[name]) | ~labelled[:, k, None, None]
                 for k, (name, task) in enumerate(self.tasks.items())]
        mask = torch.stack(masks).all(dim=0)
        m = mask.unsqueeze(1)
        ys, y_hats = [], []
        for k, (name, task) in enumerate(self.tasks.items()):
            lab = labelled[:, k].view(-1, 1, 1, 1)
            y_hat = self.encode(task, preds[name], pred_kind, sample) * m
            # a missing class map gets a fresh hard draw; any other missing label the
            # prediction itself (with its gradient: the task is unlabelled)
            fill = (self.encode(task, preds[name], "hard", sample) * m
                    if task.label_dims == 0 else y_hat)
            label = self.encode(task, targets[name], "label", sample).to(y_hat.dtype)
            ys.append(torch.where(lab, label, fill))
            y_hats.append(torch.where(lab, y_hat.detach(), y_hat))
        return torch.cat(ys, dim=1), torch.cat(y_hats, dim=1), mask

    # -------------------------------------------------------------------- terms

    def model_distance(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """d1 ``[N]``: latent distance through the frozen auto-encoder (trains the model)."""
        n = len(y)
        with frozen(self.ae):
            latent = self.ae.encode(torch.cat([y, y_hat]).to(self._dtype()))[0]
        return latent_distance(latent[:n], latent[n:])

    def autoencoder_terms(self, y: Tensor, y_hat: Tensor, mask: Tensor
                          ) -> tuple[Tensor, Tensor]:
        """(d2, reconstruction) ``[N]`` each, from detached inputs (trains the auto-encoder)."""
        n = len(y)
        inputs = torch.cat([y, y_hat]).detach()
        latent, indices, sizes = self.ae.encode(inputs.to(self._dtype()))
        logits = _fp32(self.ae.heads["recon"](self.ae.decode(latent, indices, sizes)))
        recon = self.reconstruction(logits, inputs.to(logits.dtype), torch.cat([mask, mask]))
        return latent_distance(latent[:n], latent[n:]), recon[:n] + recon[n:]

    def reconstruction(self, logits: Tensor, inputs: Tensor, mask: Tensor) -> Tensor:
        """Sum over tasks of each task's reconstruction loss of its channels ``[N]``."""
        total = torch.zeros(len(logits), dtype=logits.dtype, device=logits.device)
        bounds = torch.tensor([0, *self.channels]).cumsum(0).tolist()
        for task, lo, hi in zip(self.tasks.values(), bounds[:-1], bounds[1:], strict=True):
            total = total + task.reconstruction_loss(logits[:, lo:hi], inputs[:, lo:hi], mask)
        return total

    def terms(self, views: tuple[tuple[Mapping, Mapping], tuple[Mapping, Mapping]],
              labelled: Tensor, sample: Sampler) -> dict[str, Tensor]:
        """Per-image d1, d2 and reconstruction ``[N]`` from views 1 and 2 (preds, targets)."""
        (preds1, targets1), (preds2, targets2) = views
        y1, y_hat1, _ = self.stacks(preds1, targets1, labelled, "hard", sample)
        detached2 = {k: v.detach() for k, v in preds2.items()}
        y2, y_hat2, mask2 = self.stacks(detached2, targets2, labelled, "soft", sample)
        d2, recon = self.autoencoder_terms(y2, y_hat2, mask2)
        return {"d1": self.model_distance(y1, y_hat1), "d2": d2, "recon": recon}

    def reference_terms(self, views, labelled: Tensor, sample: Sampler) -> dict[str, Tensor]:
        """The literal per-image form of :meth:`terms`: every image alone through the
        auto-encoder at batch 1, as the code runs it (test oracle)."""
        (preds1, targets1), (preds2, targets2) = views
        rows: dict[str, list[Tensor]] = {"d1": [], "d2": [], "recon": []}
        def row(maps: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
            return {k: v[i:i + 1] for k, v in maps.items()}

        for i in range(len(labelled)):
            lab = labelled[i:i + 1]
            y1, y_hat1, _ = self.stacks(row(preds1, i), row(targets1, i), lab, "hard", sample)
            p2 = {k: v.detach() for k, v in row(preds2, i).items()}
            y2, y_hat2, m2 = self.stacks(p2, row(targets2, i), lab, "soft", sample)
            with frozen(self.ae):
                e1, e1_hat = self.ae.encode(y1)[0], self.ae.encode(y_hat1)[0]
            rows["d1"].append(latent_distance(e1, e1_hat))
            recon = torch.zeros(1, dtype=y2.dtype, device=y2.device)
            latents = []
            for x in (y2.detach(), y_hat2.detach()):
                latent, indices, sizes = self.ae.encode(x)
                logits = self.ae.heads["recon"](self.ae.decode(latent, indices, sizes))
                recon = recon + self.reconstruction(logits, x, m2)
                latents.append(latent)
            rows["d2"].append(latent_distance(*latents))
            rows["recon"].append(recon)
        return {k: torch.cat(v) for k, v in rows.items()}

    def _dtype(self) -> torch.dtype:
        return next(self.ae.parameters()).dtype


def _fp32(x: Tensor) -> Tensor:
    """At least float32: losses stay fp32 when the auto-encoder runs under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _hard_sample(task: Task, pred: Tensor) -> Tensor:
    return task.encode_pred(pred)


@METHODS.register("jtr")
class JointTaskRegularisation(Method):
    """JTR (Nishi et al., CVPR 2024): one joint-task auto-encoder's latent space regularises
    all tasks at once (cost linear in the number of tasks). Options: :class:`JTROptions`."""

    n_views = 3
    Options = JTROptions
    options: JTROptions

    def __init__(self, tasks: Mapping[str, Task], options: JTROptions) -> None:
        super().__init__(tasks, options)
        self.loss_fn = JTRLoss(self.tasks, options)

    def joint_space(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                    source: str, target: str) -> JointMaps:
        """The latents of every task's stacked predictions and of the stacked labels (all
        labelled: an evaluation image), segmentation as the one-hot of its argmax; the pair
        only picks the two maps shown beside them."""
        n = len(next(iter(preds.values())))
        labelled = torch.ones(n, len(self.tasks), dtype=torch.bool,
                              device=next(iter(preds.values())).device)
        y, y_hat, _ = self.loss_fn.stacks(preds, targets, labelled, "hard",
                                          lambda task, p: task.encode_pred_eval(p))
        latent = self.loss_fn.ae.encode(torch.cat([y_hat, y]).to(self.loss_fn._dtype()))[0]
        return latent[:n], latent[n:], ("E(predictions)", "E(labels)")

    def compute(self, model: nn.Module, batch: Batch) -> tuple[Losses, ModelOutput]:
        b = len(batch)
        out = model(torch.cat([v.image for v in batch.views]))  # one pass: BN over all views
        split = [{k: v[i * b:(i + 1) * b] for k, v in out.preds.items()} for i in range(3)]
        features0 = {k: v[:b] for k, v in out.features.items()}
        losses = supervised_losses(self.tasks, batch, split[0], view=0)
        views = ((split[1], batch.views[1].targets), (split[2], batch.views[2].targets))
        terms = self.loss_fn.terms(views, batch.labelled, _hard_sample)
        o = self.options
        ae_dist = o.dist_weight * o.recon_weight if o.ae_dist_weight is None else o.ae_dist_weight
        extra = {"jtr_dist": o.dist_weight * terms["d1"].mean(),
                 "jtr_ae_dist": ae_dist * terms["d2"].mean(),
                 "jtr_recon": o.recon_weight * terms["recon"].mean()}
        return Losses(losses, extra), ModelOutput(split[0], features0)
