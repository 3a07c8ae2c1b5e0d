"""Set-ups that run but are probably not what was meant: said once at the start of a run, as
``warning: ...`` lines on stderr (never an error: each has a legitimate use).

- the evaluation split is the training split (the reported metrics are training metrics);
- a task has no labelled training image under the regime (its head learns only through what
  the method passes between tasks, if anything);
- an encoder that the papers start from ImageNet weights starts from random ones;
- ImageNet weights fed images that are not normalised as ImageNet's were.
"""

from __future__ import annotations

import sys

from mtpsl.core.config import trained_model
from mtpsl.engine.build import Experiment, takes_backbone
from mtpsl.engine.summary import label_availability
from mtpsl.models import MODELS


def setup_warnings(exp: Experiment) -> list[str]:
    """The warnings of ``exp``'s set-up, worded for the user (empty when all is as usual)."""
    cfg = exp.config
    found = []
    if cfg.dataset.train_split == cfg.dataset.eval_split:
        found.append(f"dataset.train_split and dataset.eval_split are both "
                     f"{cfg.dataset.eval_split!r}: the reported metrics are measured on the "
                     f"training images")
    available = label_availability(exp.train_set.source, len(exp.split), exp.split.task_names)
    counts = exp.split.counts(available)
    unlabelled = [task for task, n in counts.items() if n == 0]
    if unlabelled:
        found.append(f"{', '.join(unlabelled)}: no labelled training image under "
                     f"labels.regime={cfg.labels.regime} (of {len(exp.split)} images); "
                     f"{'its head learns' if len(unlabelled) == 1 else 'their heads learn'} "
                     f"only through the method's cross-task terms, if any")
    network = trained_model(cfg)[0]
    if model_takes_backbone(network) and cfg.model.backbone.weights is None:
        found.append(f"model.backbone.weights is not set: the {cfg.model.backbone.name} "
                     f"encoder of {network!r} starts from random weights, where the "
                     f"papers start from ImageNet ones (give a local file: "
                     f"model.backbone.weights=PATH; nothing is downloaded)")
    elif (model_takes_backbone(network) and cfg.model.backbone.normalize == "none"
          and cfg.model.backbone.weights is not None):
        found.append("model.backbone.weights is set but model.backbone.normalize is none: "
                     "ImageNet weights expect inputs normalised with ImageNet's channel "
                     "statistics (model.backbone.normalize=imagenet)")
    return found


def model_takes_backbone(model: str) -> bool:
    """Whether the registered model ``model`` builds an encoder from ``model.backbone``."""
    try:
        return takes_backbone(MODELS.get(model))
    except KeyError:
        return False


def warn_about_setup(exp: Experiment) -> None:
    for line in setup_warnings(exp):
        print(f"warning: {line}", file=sys.stderr, flush=True)
