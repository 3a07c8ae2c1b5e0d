"""Checkpoints that are verified before they are used.

A checkpoint is a ``torch.save``-d dict of tensors and plain containers (so it loads with
``torch.load(weights_only=True)`` and reading one never runs pickled code), written with
:func:`mtpsl.core.files.atomic_write` (a kill mid-write leaves the previous file intact). It carries

- ``format``: :data:`FORMAT`; a file of another format is refused, not guessed at;
- ``sha256``: a digest of every other entry (each tensor's dtype, shape and bytes, every plain
  value), so flipped bytes inside tensor data are found before the weights are used;
- what identifies the experiment: the config, the split's digest and the datasets'
  fingerprints (checked by :func:`mtpsl.engine.run.resume`);
- ``model_card`` (:mod:`mtpsl.engine.card`): the tasks (kinds, parameters, class names and
  colours) and the input the model takes, so inference needs no dataset. Checkpoints written
  before it existed lack it; they still load, taking the tasks from their dataset.

:func:`load_checkpoint` checks all of that plus the structure (a dict with the keys the caller
needs, of the right types, and a well-formed model card where there is one) and the counters
(:func:`check_counters`: a digest proves only that the file is the one written, not that what
was written is possible); :func:`load_module_state` checks that tensors fit the module they are
loaded into (shape and kind of dtype), and
:func:`nonfinite_entries` finds NaN/inf weights. Every failure is a
:class:`~mtpsl.core.errors.CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtpsl.core.errors import CheckpointError
from mtpsl.core.files import atomic_write, stale_temps
from mtpsl.engine.card import CARD_KEY, check_card

__all__ = ["FORMAT", "atomic_write", "load_checkpoint", "save_checkpoint", "stale_temps"]

CHECKPOINT = "checkpoint.pt"
"""A run folder's checkpoint file."""
FORMAT = 2
"""Version of the checkpoint layout; 1 was the unversioned layout of mtpsl 0.1 (no digest)."""
DIGEST_KEY = "sha256"

INFERENCE_KEYS: dict[str, type | tuple[type, ...]] = {
    "epoch": int, "config": dict, "model": dict, "task_names": list,
}
"""What eval, predict, export and figures need."""
RESUME_KEYS: dict[str, type | tuple[type, ...]] = {
    **INFERENCE_KEYS, "step": int, "method": dict, "weighting": dict, "optim": dict,
    "rng": dict, "identity": dict,
}
"""What resuming a run needs as well."""


def _update(hasher, value: Any) -> None:
    """Feed ``value`` to ``hasher`` unambiguously: type tags, lengths, tensor bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        hasher.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        hasher.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _update(hasher, key)
            _update(hasher, value[key])
    elif isinstance(value, list | tuple):
        hasher.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _update(hasher, item)
    else:
        hasher.update(f"V{type(value).__name__}:{value!r};".encode())


def payload_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over every entry of ``state`` except the digest itself."""
    hasher = hashlib.sha256()
    _update(hasher, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return hasher.hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` (+ format and digest) atomically.

    It is serialised in memory first, so a full disk is an ordinary ``OSError`` from the file
    write (the previous checkpoint stays) instead of an error deep inside torch's zip writer.
    """
    full = {**state, "format": FORMAT}
    full[DIGEST_KEY] = payload_digest(full)
    buffer = io.BytesIO()
    torch.save(full, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda f: f.write(data))


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    required: Mapping[str, type | tuple[type, ...]] = INFERENCE_KEYS,
) -> dict[str, Any]:
    """Read and verify a checkpoint: safe unpickling, format, digest, ``required`` keys."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read: {err.strerror or err}") from None
    except Exception as err:  # corrupt, truncated or unsafe pickles raise many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a checkpoint dict")
    found = state.get("format", 1)
    if found != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {found!r}, but this mtpsl reads format {FORMAT} "
            "(format 1 files of mtpsl 0.1 carry no digest and cannot be verified)"
        )
    if state.get(DIGEST_KEY) != payload_digest(state):
        raise CheckpointError(
            f"{path}: checksum mismatch: the file is corrupt (its content changed after it "
            "was written); use another copy or retrain"
        )
    check_structure(state, path, required)
    return state


def check_structure(
    state: Mapping[str, Any], path: Path, required: Mapping[str, type | tuple[type, ...]]
) -> None:
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    for key, kind in required.items():
        if not isinstance(state[key], kind) or (isinstance(state[key], bool) and kind is int):
            raise CheckpointError(
                f"{path}: checkpoint entry {key!r} is a {type(state[key]).__name__}"
            )
    model = state.get("model")
    if isinstance(model, dict):
        odd = [k for k, v in model.items() if not isinstance(v, torch.Tensor)]
        if odd:
            raise CheckpointError(f"{path}: model entry {odd[0]!r} is not a tensor")
    if CARD_KEY in state:
        check_card(state[CARD_KEY], path, state.get("task_names"))
    check_counters(state, path)


def check_counters(state: Mapping[str, Any], path: Path) -> None:
    """Every counter the checkpoint holds is a whole number in the range its own config
    allows, so a file written (or re-digested) with impossible values is refused instead of
    printed or resumed: ``epoch`` in [0, train.epochs]; ``step`` >= 0, and > 0 only inside an
    unfinished epoch (its upper bound, the steps of an epoch, is checked by the trainer, which
    knows them); each schedule's ``last_epoch`` equal to ``epoch`` (schedules step once per
    epoch); optimiser ``step`` counts and BatchNorm's ``num_batches_tracked`` finite and >= 0;
    the fp16 loss scale finite and > 0; the partial epoch's loss sums finite."""
    epochs = _config_epochs(state.get("config"))
    epoch = _whole(state, "epoch", path, 0, epochs, "train.epochs of its config")
    step = _whole(state, "step", path, 0, None, "")
    if step and epoch is not None and epochs is not None and epoch >= epochs:
        raise CheckpointError(f"{path}: checkpoint entry 'step' is {step} after the last of the "
                              f"run's {epochs} epochs (train.epochs of its config)")
    model = state.get("model")
    if isinstance(model, Mapping):
        for key, t in model.items():
            if key.endswith("num_batches_tracked") and isinstance(t, torch.Tensor):
                _nonnegative(t, path, f"model.{key}")
    optim = state.get("optim")
    if isinstance(optim, Mapping):
        for i, sched in _indexed(optim.get("schedulers")):
            if epoch is not None and isinstance(sched, Mapping) and "last_epoch" in sched:
                where = f"optim.schedulers[{i}].last_epoch"
                if not _is_int(sched["last_epoch"]) or sched["last_epoch"] != epoch:
                    raise CheckpointError(
                        f"{path}: checkpoint entry {where!r} is {sched['last_epoch']!r}, but "
                        f"'epoch' is {epoch} (schedules step once per epoch)")
        for i, opt in _indexed(optim.get("optimizers")):
            per_param = opt.get("state") if isinstance(opt, Mapping) else None
            for pid, entry in (per_param.items() if isinstance(per_param, Mapping) else ()):
                if isinstance(entry, Mapping) and "step" in entry:
                    _nonnegative(entry["step"], path, f"optim.optimizers[{i}].state.{pid}.step")
    scaler = state.get("scaler")
    if isinstance(scaler, Mapping) and scaler:
        scale = scaler.get("scale")
        if not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise CheckpointError(f"{path}: checkpoint entry 'scaler.scale' is {scale!r}, not "
                                  "a finite positive loss scale")
        if "_growth_tracker" in scaler:
            _nonnegative(scaler["_growth_tracker"], path, "scaler._growth_tracker")
    partial = state.get("partial")
    sums = partial.get("sums") if isinstance(partial, Mapping) else None
    if isinstance(sums, Mapping):
        bad = nonfinite_entries(sums.items())
        if bad:
            raise CheckpointError(f"{path}: checkpoint entry 'partial.sums.{bad[0]}' is "
                                  "non-finite (NaN/inf)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_epochs(config: Any) -> int | None:
    """``train.epochs`` of a checkpoint's config dict, where it records a whole number."""
    train = config.get("train") if isinstance(config, Mapping) else None
    epochs = train.get("epochs") if isinstance(train, Mapping) else None
    return epochs if _is_int(epochs) else None


def _whole(state: Mapping[str, Any], key: str, path: Path, low: int, high: int | None,
           why: str) -> int | None:
    """``state[key]`` (absent: None), refused unless a whole number in [low, high]."""
    if key not in state:
        return None
    value = state[key]
    if not _is_int(value):
        raise CheckpointError(f"{path}: checkpoint entry {key!r} is a {type(value).__name__} "
                              f"({value!r}), not a whole number")
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high} ({why})" if high is not None else f">= {low}"
        raise CheckpointError(f"{path}: checkpoint entry {key!r} is {value}, outside {bounds}")
    return value


def _nonnegative(value: Any, path: Path, where: str) -> None:
    """A counter (a number or a tensor of them) that is finite and >= 0."""
    if isinstance(value, torch.Tensor):
        ok = (not value.is_complex() and value.dtype != torch.bool
              and bool((value.isfinite() & (value >= 0)).all()))
        shown = value.tolist() if value.numel() == 1 else f"a tensor {tuple(value.shape)}"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and (
            math.isfinite(value) and value >= 0)
        shown = value
    if not ok:
        raise CheckpointError(f"{path}: checkpoint entry {where!r} is {shown!r}, not a "
                              "finite count >= 0")


def _indexed(items: Any) -> list[tuple[int, Any]]:
    return list(enumerate(items)) if isinstance(items, list | tuple) else []


def load_module_state(module: nn.Module, state: Mapping[str, Any], path: Path, what: str) -> None:
    """``module.load_state_dict(state)`` whose mismatches name the file and the entries."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    given = {k: state[k] for k, v in expected.items()
             if isinstance(state.get(k), torch.Tensor) and isinstance(v, torch.Tensor)}
    wrong = [f"{k} {tuple(t.shape)} (model: {tuple(expected[k].shape)})"
             for k, t in given.items() if t.shape != expected[k].shape]
    # load_state_dict casts silently: int/bool/complex values in float weights would be
    # evaluated as if trained
    mistyped = [f"{k} {t.dtype} (model: {expected[k].dtype})"
                for k, t in given.items() if _dtype_kind(t) != _dtype_kind(expected[k])]
    problems = [
        f"{label} {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", wrong), ("wrong dtype", mistyped))
        if items
    ]
    if problems:
        raise CheckpointError(f"{path}: {what} does not fit this model: {'; '.join(problems)}")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: {what} cannot be loaded: {first}") from None


def _dtype_kind(t: torch.Tensor) -> str:
    """float, complex, bool or integer: what a value means (the width may differ)."""
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "integer"


def load_state(target: Any, state: Any, path: Path, what: str) -> None:
    """``target.load_state_dict(state)`` for optimisers, methods, weightings, scalers."""
    if isinstance(target, nn.Module):
        load_module_state(target, state, path, what)
        return
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: {what} state does not fit this run: {first}") from None


def nonfinite_entries(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating-point tensors holding NaN or inf."""
    return [
        name for name, t in named
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())
    ]


def require_finite(named: Iterable[tuple[str, torch.Tensor]], path: Path, what: str) -> None:
    bad = nonfinite_entries(named)
    if bad:
        raise CheckpointError(
            f"{path}: {what} holds non-finite values (NaN/inf) in {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}; it is not served"
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], path: Path | None = None) -> None:
    try:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: random-number state cannot be restored: {err}") from None
