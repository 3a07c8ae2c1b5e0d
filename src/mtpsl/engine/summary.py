"""What a run records about itself: ``final_metrics.json`` (metrics, split counts, the set-up
signature that groups seeds, pairing digests) and the environment bitwise reproducibility
depends on. Kept apart from the training loop, which only calls :func:`final_metrics`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mtpsl.core.signature import setup_from_config, signature
from mtpsl.data.base import TaskDataset
from mtpsl.data.splits import Split
from mtpsl.engine.build import Experiment
from mtpsl.engine.speed import speed_environment
from mtpsl.models import count_parameters
from mtpsl.tasks.scoring import higher_is_better, primary_keys

if TYPE_CHECKING:
    from mtpsl.engine.history import History


def setup_signature(exp: Experiment, fingerprints: dict[str, str]) -> dict:
    """``setup`` (the config minus :data:`~mtpsl.core.signature.NOT_SETUP`, plus the datasets'
    fingerprints and image size) and ``setup_signature``, its SHA-256: runs of one experiment
    that differ only in their seed share it, so tables group seeds of one set-up and no more."""
    data = setup_from_config(exp.config.model_dump())
    data["data"] = {**fingerprints,
                    "size": [exp.eval_set.source.height, exp.eval_set.source.width]}
    return {"setup": data, "setup_signature": signature(data)}


def run_environment(cfg, device: torch.device) -> dict:
    """What bitwise reproducibility depends on: the build, the threads, the hardware and the
    determinism flags (same values, same seed: same weights on CPU), and the speed keys as
    resolved for this machine with the reason for each (:func:`speed_environment`)."""
    import platform

    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name() or platform.processor() or platform.machine()
    return {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "hardware": hardware, "threads": torch.get_num_threads(),
        "deterministic": cfg.deterministic,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "compile": cfg.compile, **speed_environment(cfg, device),
        **placement(device),
    }


JOB_ID_VARIABLES = ("MTPSL_JOB_ID", "SLURM_JOB_ID")
"""Where a run finds its scheduler job id: mtpsl's launchers set the first (a SLURM array
task's own id included), a run started by hand in an sbatch script has the second."""


def placement(device: torch.device) -> dict:
    """Where the run trained: ``host``, ``gpu`` (the card's UUID, which tells two cards of a
    kind apart; None on the CPU) and ``job_id`` (None outside a scheduler or launcher).
    Recorded so that a grid's cells can be traced; no result may depend on them."""
    import os
    import socket

    gpu = None
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        gpu = f"GPU-{uuid}" if uuid is not None else torch.cuda.get_device_name(device)
    job = next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v)), None)
    return {"host": socket.gethostname(), "gpu": gpu, "job_id": job}


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        return None


def final_metrics(exp: Experiment, history: History, seconds: float,
                  device: torch.device, identity: dict) -> dict:
    """``final_metrics.json``: the run's last (and validation-best) metrics, its split counts,
    set-up signature, pairing and environment."""
    last = history.last_eval() or {}
    final = {
        "name": exp.config.name,
        "method": exp.config.method.name,
        "label": exp.config.label or exp.config.method.name,
        "regime": exp.split.regime,
        "seed": exp.config.seed,
        "epochs": exp.config.train.epochs,
        "eval_split": exp.config.dataset.eval_split,
        "reported": "last epoch",
        "metrics": _eval_metrics(last),
        **_extra_eval_metrics(last),
        **split_counts(exp),
        "parameters": count_parameters(exp.model),
        **setup_signature(exp, identity["datasets"]),
        "pairing": {"split": identity["split"], "initial_weights": identity["initial_weights"]},
        "environment": run_environment(exp.config.train, device),
        "train_seconds_this_session": round(seconds, 1),
    }
    val_rows = [r for r in history.rows if any(k.startswith("val/") for k in r)]
    if val_rows:
        # A best epoch, chosen on the carved validation split only, by the first task's
        # primary metric; reported beside (never instead of) the last epoch.
        key = primary_keys(exp.tasks)[0]
        pick = max if higher_is_better(exp.tasks)[key] else min
        best = pick(val_rows, key=lambda r: r[f"val/{key}"])
        final["best_epoch_on_validation_split"] = {
            "epoch": best["epoch"],
            "selected_by": f"val/{key}",
            "metrics": _eval_metrics(best),
        }
    return final


def split_counts(exp: Experiment) -> dict:
    """``split``: labelled images per task that training can see (the regime's labels that
    also exist in the data), and ``split_detail``: the regime's own counts, per-source counts
    for cross-dataset data, and how they were counted.

    The regime alone (e.g. ``full``) would claim labels a source never provides. Which labels
    exist comes from the dataset's ``available`` ``[N, T]`` array, filled from file listings
    when it was opened (no label is decoded here); a dataset without one falls back to the
    regime's counts, with a note saying so.
    """
    split = exp.split
    dataset = exp.train_set.source
    available = label_availability(dataset, len(split), split.task_names)
    detail: dict = {"images": len(split), "labelled_by_regime": split.counts()}
    if exp.val_set is not None:
        detail["carved_for_validation"] = len(exp.val_set)
    if available is None:
        detail["note"] = (f"{type(dataset).__name__}'s available array does not match the "
                          "split's images and tasks: the counts are the regime's")
        return {"split": split.counts(), "split_detail": detail}
    per_source = _per_source_counts(dataset, split, available)
    if per_source:
        detail["per_source"] = per_source
    detail["note"] = ("images of the training split (split.json) whose label the regime "
                      "gives and the data has" + (", validation carve included"
                                                  if exp.val_set is not None else ""))
    return {"split": split.counts(available), "split_detail": detail}


def label_availability(dataset: TaskDataset, n_images: int,
                       task_names: Sequence[str]) -> np.ndarray | None:
    """Which labels exist, bool ``[N, T]`` in ``task_names`` order, or None when unknown.

    Read from the dataset's ``available`` array (filled from its file listings); None where
    it does not match the split's images and tasks.
    """
    available = dataset.available
    if tuple(dataset.task_names) != tuple(task_names):
        return None
    if available.shape != (n_images, len(task_names)):
        return None
    return available.astype(bool)


def _per_source_counts(dataset: TaskDataset, split: Split, available: np.ndarray) -> dict:
    """Cross-dataset data: ``{source: {"images": n, task: count, ...}}``; {} otherwise."""
    ids, names = dataset.domain_ids, dataset.domain_names
    if ids is None or names is None:
        return {}
    ids = np.asarray(ids)
    return {name: {"images": int((ids == d).sum()), **split.counts(available, ids == d)}
            for d, name in enumerate(names)}


def _extra_eval_metrics(row: dict) -> dict:
    """``{"metrics@<set>": {...}}`` for every extra evaluation set in ``row``."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key.startswith("eval@"):
            name, _, metric = key.removeprefix("eval@").partition("/")
            out.setdefault(f"metrics@{name}", {})[metric] = value
    return out


def _eval_metrics(row: dict) -> dict[str, float]:
    return {k.removeprefix("eval/"): v for k, v in row.items() if k.startswith("eval/")}
