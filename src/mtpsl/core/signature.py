"""Set-up signatures: what defines an experiment apart from its seed, and names for set-ups.

A run's *set-up* is its resolved config without the keys of :data:`NOT_SETUP` (where files
go, how progress is shown, the seed), plus its datasets' fingerprints and image size. Runs
that share the SHA-256 of their set-up (the *signature*) are seeds of one experiment; tables
average over those and nothing else. A set-up's *context* is its set-up without the
``method`` section: rows of one context differ only in the method (and its weighting) and are
compared against the baseline of the same context.

:func:`labels` names each set-up by what differs between them (``sl · cagrad``,
``resnet18 · onelabel``), so a table row says what it is. Pure Python: report and compare
read it without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NOT_SETUP = {"top": ("name", "label", "seed", "output_dir", "compare", "log"),
             "dataset": ("root",),
             "train": ("device", "progress", "num_workers", "threads", "eval_batch_size",
                       "checkpoint_every", "fused_optimizer", "dist_timeout_s")}
"""Config keys that do not change what is learned (where files go, how progress is shown)
or that vary between the seeds of one set-up; everything else defines the experiment.
``train.amp`` and ``train.channels_last`` do: a run records them resolved for its machine
(bf16 or off, never "auto"), so runs of different precisions are never pooled as seeds."""
UNSET_IS_ABSENT: dict[str, dict[str, Any]] = {
    "train": {"callbacks": [], "require_weights": False},
    "model": {"backbone.normalize": "none"},
    "method": {"network": None},
    "dataset": {"augment.scale_range": None, "augment.crop_size": None,
                "augment.cat_max_ratio": None, "augment.photometric": False}}
"""Keys added after runs were recorded (dotted below their section), dropped from the set-up
while they hold this value: a run that does not use them keeps the signature it had before
they existed."""
PER_SEED_OPTIONS = ("teacher",)
"""``method.options`` that name another run (a stage-2 run's teacher: in a grid, the cell of
the same seed): like the seed they vary between the seeds of one set-up, so they are no part
of it (the teacher's own config is checked against the run's when it is loaded)."""
RUN_SEED = "run seed"
"""``labels.seed`` of a set-up whose split is drawn from each run's own seed."""
METHOD_SECTION = "method"


def setup_from_config(config: Mapping[str, Any]) -> dict:
    """The set-up part of a resolved config (a ``model_dump`` or a run's config.yaml), in
    JSON's types (tuples become lists), so it equals what ``final_metrics.json`` holds."""
    data = json.loads(json.dumps(dict(config), default=str))
    for key in NOT_SETUP["top"]:
        data.pop(key, None)
    for section in ("dataset", "train"):
        for key in NOT_SETUP[section]:
            (data.get(section) or {}).pop(key, None)
    for section, defaults in UNSET_IS_ABSENT.items():
        for key, default in defaults.items():
            *parents, leaf = key.split(".")
            values = data.get(section) or {}
            for part in parents:
                values = values.get(part) if isinstance(values, dict) else None
            if isinstance(values, dict) and leaf in values and values[leaf] == default:
                del values[leaf]
    labels = data.get("labels")
    if isinstance(labels, dict) and labels.get("seed") is None:
        labels["seed"] = RUN_SEED
    return without_per_seed(data)


def without_per_seed(setup: dict) -> dict:
    """``setup`` without :data:`PER_SEED_OPTIONS` (in place; also for set-ups recorded before
    they were left out)."""
    options = (setup.get(METHOD_SECTION) or {}).get("options")
    if isinstance(options, dict):
        for key in PER_SEED_OPTIONS:
            options.pop(key, None)
    return setup


def signature(setup: Mapping[str, Any]) -> str:
    """A short SHA-256 of the canonical JSON of ``setup`` (key order does not matter)."""
    return hashlib.sha256(_text(setup).encode()).hexdigest()[:16]


def context_of(setup: Mapping[str, Any]) -> dict:
    """The set-up without its method section: what a method is compared under."""
    return {k: v for k, v in setup.items() if k != METHOD_SECTION}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values: ``{"model": {"width": 0.25}}`` -> ``{"model.width": 0.25}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def differing_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value differs between the set-ups that have them, in first-seen order.

    A key only some set-ups have, with one value among them, names nothing new: it comes with
    a method (``method.options.con_weight`` of xtc), which the method's name already says.
    """
    keys = dict.fromkeys(k for flat in flats for k in flat)
    return [k for k in keys if len({_text(flat[k]) for flat in flats if k in flat}) > 1]


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def part(key: str, value: Any) -> str:
    """One label part: a bare name for text values (``cagrad``), ``leaf=value`` otherwise."""
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, str) and value:
        return value if len(value) <= 20 else f"{leaf}={value[:8]}…"
    shown = _text(value).replace('"', "")
    return f"{leaf}={shown if value is not None else 'none'}"


def labels(setups: Sequence[Mapping[str, Any]], first: Sequence[str] | None = None,
           skip: Iterable[str] = (), within: Sequence[str] | None = None) -> list[str]:
    """A name for each set-up from what differs between them, joined by ``·``.

    ``first`` (one per set-up) leads each name, e.g. the run's method label; parts equal to it
    and keys in ``skip`` are left out. Names that would still collide (within one group of
    ``within``, e.g. the table's set-up column) get the signature.
    """
    flats = [flatten(s) for s in setups]
    keys = [k for k in differing_keys(flats) if k not in set(skip)]
    names = []
    for n, flat in enumerate(flats):
        parts = [first[n]] if first else []
        parts += [p for k in keys if k in flat
                  for p in [part(k, flat[k])] if p not in parts]
        names.append(" · ".join(parts) or "all")
    keys_in = list(zip(within or [""] * len(names), names, strict=True))
    for n, setup in enumerate(setups):
        if keys_in.count(keys_in[n]) > 1:
            names[n] = f"{names[n]} #{signature(setup)[:6]}"
    return names
