"""JTR: joint-task regularisation (Nishi, Kim, Li & Pfister, CVPR 2024), as its code defines it
(``KentoNishi/JTR-CVPR-2024`` at ``f6a2279``, ``code/``; facts in ``shared/spec/jtr-reference.md``).

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
masks of the tasks labelled for the image. Predictions are masked by ``M`` before encoding, so a
masked pixel encodes as an invalid label pixel does (depth ``Phi(-depth_mean / depth_std)``,
normals 0.5, class maps 0); labels are not masked. A labelled task's prediction is detached; a
missing label's slot in ``Y`` is filled from the prediction (the same tensor, or a fresh
hard-Gumbel draw for class maps), so JTR reaches the multi-task model only through the
predictions of unlabelled tasks.

Three views (one model pass over all three; ``n_views = 3``): view 0 carries the supervised
losses; views 1 and 2 are independent random zooms of view 0.

- **view 1 trains the model only**: ``d1 = 1 - mean cos(E(Y1), E(Y_hat1))`` (cosine over
  channels, mean over latent positions; ``Y_hat1`` with hard-Gumbel class maps) through ``g``
  with its parameters frozen;
- **view 2 trains the auto-encoder only**: ``Y2`` and ``Y_hat2`` (soft class maps) detached;
  ``d2`` as ``d1``, plus the reconstruction of both inputs, per task its
  ``Task.reconstruction_loss`` over ``M`` (segmentation BCE-with-logits, depth L1 of the
  sigmoid, normals 1 - cos). The targets and denominators are the code's (``recon_target``,
  ``recon_count``): segmentation against fresh hard draws where the input was a prediction,
  depth against ``Phi`` of the raw label or prediction (of ``Y_hat2``'s encoded input, so
  encoded twice), normals against the raw vector (``Y_hat2``: its encoded input), each sum
  divided by the target's number of non-zero elements. Tasks the code does not have (binary
  maps, heatmaps) reconstruct their own inputs, averaged over ``M``.

Loss per image ``L_SL + dist_weight d1 + ae_dist_weight d2 + recon_weight L_recon``; the code's
weights are 4, 4 x 2 = 8 (its recon weight also scales d2) and 2, the defaults here. The
auto-encoder trains in the main optimiser group, as the code's one Adam does. One batched pass
per view replaces the code's per-image loop and per-step ``deepcopy`` (the auto-encoder's
normalisations are per sample, :class:`SampleNorm`; view 1 freezes its parameters);
:meth:`JTRLoss.reference_terms` is the per-image form.

Departures from the paper and the code, with the options that restore the code and the tests
that pin them: ``docs/fidelity.md``, section "jtr".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mtpsl.data.batch import Batch
from mtpsl.methods.base import METHODS, JointMaps, Losses, Method, frozen, supervised_losses
from mtpsl.methods.joint_space import SampleNorm
from mtpsl.methods.terms import map_cosine_distance
from mtpsl.models import HeadSpec, ModelOutput
from mtpsl.models.segnet import SegNet
from mtpsl.tasks import Task, task_kind

Sampler = Callable[[Task, Tensor, str], Tensor]
"""A hard sample of a prediction in a task's input space (default: ``task.encode_pred``). The
string names the draw (``y_hat1``, ``fill1``, ``fill2``, ``recon_y2``, ``recon_y_hat2``):
the code draws each independently; a test's stand-in can tell them apart."""

CODE_RECON_KINDS = frozenset({"segmentation", "depth", "normal"})
"""Task types whose reconstruction the code defines (``code/utils/process.py`` 89-111)."""
COSINE_EPS = 1e-12
"""``F.cosine_similarity``'s eps in the code's latent distances (``nyuv2_segnet_jtr.py`` 253)."""


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
    pred_mask: Literal["before_encoding", "after_encoding"] = "before_encoding"
    """Where M masks a prediction: before its encoding (the code), so a masked pixel encodes
    as an invalid label pixel does; or after it, 0 in every channel (mtpsl before issue 29,
    kept to reproduce those runs)."""
    recon_target: Literal["code", "input"] = "code"
    """What the decoder reconstructs: the code's targets (fresh Gumbel draws, depth encoded
    twice for Y_hat, raw normals for Y), or exactly the auto-encoder's own inputs."""
    recon_count: Literal["nonzero", "mask"] = "nonzero"
    """Denominator of each reconstruction term: the code's number of non-zero target elements
    (before encoding), or the number of pixels of M the term is summed over."""


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


def latent_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos`` over channels, averaged over latent positions ``[N]`` (the code's eps)."""
    return map_cosine_distance(a, b, eps=COSINE_EPS)


class JTRLoss(nn.Module):
    """The auto-encoder and the two JTR views' terms (batched and per-sample forms)."""

    def __init__(self, tasks: Mapping[str, Task], options: JTROptions) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.options = options
        self.channels = [t.out_channels for t in self.tasks.values()]
        self.kinds = [task_kind(t) for t in self.tasks.values()]
        self.ae = per_sample_autoencoder(sum(self.channels), options.ae_width)

    # -------------------------------------------------------------------- encodings

    def encode(self, task: Task, x: Tensor, kind: str, sample: Sampler, draw: str = "") -> Tensor:
        """``x`` in the auto-encoder's input space; ``kind`` is label, soft or hard."""
        if task.continuous:
            o = self.options
            return torch.special.ndtr((x - o.depth_mean) / o.depth_std)
        if kind == "label":
            return task.encode_target(x)
        if kind == "soft" and task.label_dims == 0:
            return task.as_map(x)
        return sample(task, x, draw) if kind == "hard" else task.encode_pred(x)

    def encode_pred(self, task: Task, pred: Tensor, target: Tensor, m: Tensor, kind: str,
                    sample: Sampler, draw: str = "") -> Tensor:
        """An encoded prediction masked by ``m`` ``[N, 1, H, W]`` (``pred_mask``): outside
        ``m`` the encoding of an invalid label pixel (the code's ``encode(pred * M)``), or 0."""
        encoded = self.encode(task, pred, kind, sample, draw)
        if self.options.pred_mask == "after_encoding":
            return encoded * m
        blank = task.blank_like(target)
        if blank.is_floating_point():
            blank = blank.to(encoded.dtype)
        invalid = self.encode(task, blank, "label", sample).to(encoded.dtype)
        return torch.where(m, encoded, invalid)

    def stacks(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
               labelled: Tensor, pred_kind: str, sample: Sampler, view: int = 1
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``(Y, Y_hat, M)``: stacked labels with their holes filled from the predictions,
        stacked predictions (a labelled task's detached) and the mask ``M`` ``[N, H, W]``."""
        masks = [task.valid(targets[name]) | ~labelled[:, k, None, None]
                 for k, (name, task) in enumerate(self.tasks.items())]
        mask = torch.stack(masks).all(dim=0)
        m = mask.unsqueeze(1)
        ys, y_hats = [], []
        for k, (name, task) in enumerate(self.tasks.items()):
            lab = labelled[:, k].view(-1, 1, 1, 1)
            y_hat = self.encode_pred(task, preds[name], targets[name], m, pred_kind, sample,
                                     f"y_hat{view}")
            # a missing class map gets a fresh hard draw; any other missing label the
            # prediction itself (with its gradient: the task is unlabelled)
            fill = (self.encode_pred(task, preds[name], targets[name], m, "hard", sample,
                                     f"fill{view}")
                    if task.label_dims == 0 else y_hat)
            label = self.encode(task, targets[name], "label", sample).to(y_hat.dtype)
            ys.append(torch.where(lab, label, fill))
            y_hats.append(torch.where(lab, y_hat.detach(), y_hat))
        return torch.cat(ys, dim=1), torch.cat(y_hats, dim=1), mask

    def recon_targets(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                      labelled: Tensor, mask: Tensor, y: Tensor, y_hat: Tensor,
                      sample: Sampler) -> tuple[Tensor, list[Tensor | None]]:
        """What the decoder reconstructs for ``cat[Y, Y_hat]`` (view 2, detached) and each
        task's denominators ``[2N]`` (None: M's pixel count), under ``recon_target`` and
        ``recon_count`` (the code: ``nyuv2_segnet_jtr.py`` 257-292, ``process.py`` 84-111)."""
        o = self.options
        inputs = torch.cat([y, y_hat]).detach()
        n, m = len(y), mask.unsqueeze(1)
        bounds = torch.tensor([0, *self.channels]).cumsum(0).tolist()
        outs: list[Tensor] = []
        counts: list[Tensor | None] = []
        for k, ((name, task), kind) in enumerate(zip(self.tasks.items(), self.kinds,
                                                     strict=True)):
            given = inputs[:, bounds[k]:bounds[k + 1]]
            if kind not in CODE_RECON_KINDS:
                outs.append(given)
                counts.append(None)
                continue
            raw = target = given
            if o.recon_target == "code":
                lab = labelled[:, k].view(-1, 1, 1, 1)
                pred, label = preds[name].detach(), targets[name]
                if task.label_dims == 0:  # fresh hard draws wherever the input is a prediction
                    draws = [self.encode_pred(task, pred, label, m, "hard", sample, d)
                             for d in ("recon_y2", "recon_y_hat2")]
                    raw = target = torch.cat([torch.where(lab, given[:n], draws[0]), draws[1]])
                else:  # Y: the raw label or unmasked prediction; Y_hat: its encoded input
                    raw = torch.cat([torch.where(lab, label.to(pred.dtype), pred), given[n:]])
                    target = self.encode(task, raw, "label", sample)
            outs.append(target.to(given.dtype).detach())
            counts.append((raw != 0).flatten(1).sum(1).clamp(min=1).to(given.dtype)
                          if o.recon_count == "nonzero" else None)
        return torch.cat(outs, dim=1), counts

    # -------------------------------------------------------------------- terms

    def model_distance(self, y: Tensor, y_hat: Tensor) -> Tensor:
        """d1 ``[N]``: latent distance through the frozen auto-encoder (trains the model)."""
        n = len(y)
        with frozen(self.ae):
            latent = self.ae.encode(torch.cat([y, y_hat]).to(self._dtype()))[0]
        return latent_distance(latent[:n], latent[n:])

    def autoencoder_terms(self, y: Tensor, y_hat: Tensor, mask: Tensor, targets: Tensor,
                          counts: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
        """(d2, reconstruction) ``[N]`` each, from detached inputs (trains the auto-encoder);
        ``targets`` and ``counts`` from :meth:`recon_targets`."""
        n = len(y)
        inputs = torch.cat([y, y_hat]).detach()
        latent, indices, sizes = self.ae.encode(inputs.to(self._dtype()))
        logits = _fp32(self.ae.heads["recon"](self.ae.decode(latent, indices, sizes)))
        recon = self.reconstruction(logits, targets.to(logits.dtype), torch.cat([mask, mask]),
                                    counts)
        return latent_distance(latent[:n], latent[n:]), recon[:n] + recon[n:]

    def reconstruction(self, logits: Tensor, targets: Tensor, mask: Tensor,
                       counts: Sequence[Tensor | None]) -> Tensor:
        """Sum over tasks of each task's reconstruction loss of its channels ``[N]``."""
        total = torch.zeros(len(logits), dtype=logits.dtype, device=logits.device)
        bounds = torch.tensor([0, *self.channels]).cumsum(0).tolist()
        for task, lo, hi, count in zip(self.tasks.values(), bounds[:-1], bounds[1:], counts,
                                       strict=True):
            count = None if count is None else count.to(logits.dtype)
            total = total + task.reconstruction_loss(logits[:, lo:hi], targets[:, lo:hi], mask,
                                                     count)
        return total

    def terms(self, views: tuple[tuple[Mapping, Mapping], tuple[Mapping, Mapping]],
              labelled: Tensor, sample: Sampler) -> dict[str, Tensor]:
        """Per-image d1, d2 and reconstruction ``[N]`` from views 1 and 2 (preds, targets)."""
        (preds1, targets1), (preds2, targets2) = views
        y1, y_hat1, _ = self.stacks(preds1, targets1, labelled, "hard", sample, view=1)
        detached2 = {k: v.detach() for k, v in preds2.items()}
        y2, y_hat2, mask2 = self.stacks(detached2, targets2, labelled, "soft", sample, view=2)
        targets, counts = self.recon_targets(detached2, targets2, labelled, mask2, y2, y_hat2,
                                             sample)
        d2, recon = self.autoencoder_terms(y2, y_hat2, mask2, targets, counts)
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
            y1, y_hat1, _ = self.stacks(row(preds1, i), row(targets1, i), lab, "hard", sample, 1)
            p2, t2 = {k: v.detach() for k, v in row(preds2, i).items()}, row(targets2, i)
            y2, y_hat2, m2 = self.stacks(p2, t2, lab, "soft", sample, 2)
            targets, counts = self.recon_targets(p2, t2, lab, m2, y2, y_hat2, sample)
            with frozen(self.ae):
                e1, e1_hat = self.ae.encode(y1)[0], self.ae.encode(y_hat1)[0]
            rows["d1"].append(latent_distance(e1, e1_hat))
            recon = torch.zeros(1, dtype=y2.dtype, device=y2.device)
            latents = []
            for j, x in enumerate((y2.detach(), y_hat2.detach())):
                latent, indices, sizes = self.ae.encode(x)
                logits = self.ae.heads["recon"](self.ae.decode(latent, indices, sizes))
                recon = recon + self.reconstruction(
                    logits, targets[j:j + 1], m2,
                    [None if c is None else c[j:j + 1] for c in counts])
                latents.append(latent)
            rows["d2"].append(latent_distance(*latents))
            rows["recon"].append(recon)
        return {k: torch.cat(v) for k, v in rows.items()}

    def _dtype(self) -> torch.dtype:
        return next(self.ae.parameters()).dtype


def _fp32(x: Tensor) -> Tensor:
    """At least float32: losses stay fp32 when the auto-encoder runs under autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _hard_sample(task: Task, pred: Tensor, draw: str) -> Tensor:
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
                                          lambda task, p, draw: task.encode_pred_eval(p))
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
