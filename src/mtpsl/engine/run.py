"""The training loop: schedule -> step -> evaluate -> log -> checkpoint, top to bottom.

A run directory holds everything needed to understand and reproduce the run: the resolved
config, the label split, per-epoch metrics (CSV and JSON lines), TensorBoard logs, the last
checkpoint (written atomically) and the final metrics. The reported result is always the last
epoch's on the evaluation split; a best epoch is only ever chosen on a validation split carved
from the training images, and is labelled as such.

Under ``torchrun`` every process trains on its shard of the training set and gradients are
averaged over processes (see :mod:`mtpsl.core.distributed`); only rank 0 evaluates, logs and
writes files. Speed options (``train.amp``, ``channels_last``, ``compile``...) are applied by
:mod:`mtpsl.engine.speed`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from mtpsl.core import distributed as ddp
from mtpsl.core.config import Config, apply_override, build_config, save_config
from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import (
    ConfigError,
    Interrupted,
    MtpslError,
    Preempted,
    RunFolderError,
)
from mtpsl.core.faults import fault_point
from mtpsl.core.files import write_text
from mtpsl.core.rundir import RunLock, claim_new
from mtpsl.data.fingerprint import fingerprint
from mtpsl.data.splits import Split
from mtpsl.engine.build import (
    Experiment,
    build_experiment,
    eval_loader,
    resolve_device,
    seed_everything,
    train_loader,
)
from mtpsl.engine.checkpoint import (
    RESUME_KEYS,
    load_checkpoint,
    load_state,
    nonfinite_entries,
    payload_digest,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from mtpsl.engine.evaluate import evaluate
from mtpsl.engine.history import History
from mtpsl.engine.optim import Optimisation
from mtpsl.engine.speed import (
    autocast,
    check_options,
    grad_scaler,
    optimizer_extra,
    prepare_aux,
    prepare_model,
    to_channels_last,
)
from mtpsl.engine.summary import final_metrics
from mtpsl.models import shared_parameters
from mtpsl.tasks.scoring import primary_keys
from mtpsl.weighting.gramian import SharedGramian

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(MtpslError):
    """Training diverged; the last good checkpoint is left in place."""


def build_optimisation(exp: Experiment, defaults: dict | None = None) -> Optimisation:
    """The method's groups, the weighting's own groups, and its other parameters in "main"."""
    groups = exp.method.optimizer_groups(exp.model)
    own = exp.weighting.optimizer_groups()
    owned = {id(p) for g in own for p in g.params}
    main = next((g for g in groups if g.name == "main"), None)
    if main is None:
        raise ConfigError(f"method {exp.config.method.name}: optimizer_groups() names no "
                          f"'main' group (the weighting's parameters join it)")
    main.params.extend(p for p in exp.weighting.trained_parameters() if id(p) not in owned)
    cfg = exp.config
    return Optimisation.build([*groups, *own], cfg.optim, cfg.train.epochs, defaults)


def new_run_dir(config: Config) -> Path:
    """``output_dir/name``, suffixed ``-1``, ``-2``... so an old run is never overwritten
    (``mkdir`` without ``exist_ok`` is atomic: two runs started together get two folders)."""
    base = Path(config.output_dir) / config.name
    base.parent.mkdir(parents=True, exist_ok=True)
    k = 0
    while True:
        path = base if k == 0 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1


def train(config: Config, run_dir: Path | None = None) -> dict:
    """Train a new run (in ``run_dir`` or a fresh folder) and return its final metrics.

    The folder is locked for the whole run and must not hold another run. A run that fails
    before its first training step (a config or data error, a batch larger than the data)
    leaves nothing behind. Under torchrun, rank 0 picks, locks and fills the run folder and
    every process returns the same final metrics.
    """
    env, device, owned = _start(config)
    claim = None
    started = False

    def write_start_files(exp: Experiment) -> None:
        nonlocal started
        if env.is_main:
            assert run_dir is not None  # claimed before the experiment is built
            save_config(config, run_dir / "config.yaml")
            exp.split.save(run_dir / "split.json")
        started = True

    try:
        if env.is_main:
            claim = claim_new(run_dir) if run_dir else claim_new(new_run_dir(config), True)
            run_dir = claim.run_dir
        run_dir = Path(_from_rank0(str(run_dir), env))
        seed_everything(config.seed, config.train.deterministic)
        exp = build_experiment(config)
        return _fit(exp, run_dir, None, env, device, on_ready=write_start_files)
    except BaseException:
        if claim is not None and not started:
            claim.abandon()
        raise
    finally:
        if claim is not None:
            claim.lock.release()
        if owned:
            ddp.teardown(env)


def _start(config: Config) -> tuple[DistEnv, torch.device, bool]:
    """This process's place (torchrun's environment) and device; joins the process group.

    The last value says whether this call created the process group (and must end it).
    """
    env = ddp.env_from_torchrun()
    was_up = torch.distributed.is_available() and torch.distributed.is_initialized()
    device = ddp.setup(env, resolve_device(config.train.device))
    return env, device, env.enabled and not was_up


def _from_rank0(value, env: DistEnv):
    """Rank 0's ``value`` on every process (a picklable object)."""
    if not env.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resume(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Continue a run from its last checkpoint (an epoch's end, or mid-epoch after a
    preemption) with its saved config and split.

    Only ``train.*`` keys may be overridden (e.g. ``train.epochs=300`` to train longer): the
    rest defines the experiment and must not change halfway through it. What the folder holds
    is checked against what the checkpoint recorded (config.yaml, split.json, the datasets'
    files) and any difference is refused, naming it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist")
    env = ddp.env_from_torchrun()
    lock = RunLock(run_dir).acquire() if env.is_main else None
    try:
        path = run_dir / CHECKPOINT
        if not path.exists() and not (run_dir / "config.yaml").exists():
            raise RunFolderError(
                f"{run_dir} holds no run to resume (no {CHECKPOINT}, no config.yaml: it was "
                f"stopped before it began); start it again with `mtpsl train --run-dir "
                f"{run_dir} ...`")
        if path.exists():
            state = load_checkpoint(path, required=RESUME_KEYS)
            config = _resumed_config(state, run_dir, overrides)
        else:  # killed before its first checkpoint: start again with its config and split
            state, config = None, _restarted_config(run_dir, overrides)
        env, device, owned = _start(config)
        try:
            seed_everything(config.seed, config.train.deterministic)
            split_path = run_dir / "split.json"
            # a restart killed before split.json was written draws the same split again
            split = Split.load(split_path) if state or split_path.exists() else None
            exp = build_experiment(config, split)
            if env.is_main:
                save_config(config, run_dir / "config.yaml")
                if split is None:
                    exp.split.save(split_path)
            return _fit(exp, run_dir, state, env, device)
        finally:
            if owned:
                ddp.teardown(env)
    finally:
        if lock is not None:
            lock.release()


def _resumed_config(state: dict, run_dir: Path, overrides: Sequence[str]) -> Config:
    """The checkpoint's config with the ``train.*`` overrides, checked against config.yaml."""
    path = run_dir / CHECKPOINT
    data = state["config"]
    saved = run_dir / "config.yaml"
    differing = saved_config_difference(saved, build_config(data, str(path)))
    if differing:
        raise RunFolderError(
            f"{saved} differs from the config in {path} at {differing}: the folder's "
            "config was edited or replaced; only train.* may change on resume (as "
            "overrides: mtpsl train --resume DIR train.epochs=N)")
    _check_resume_overrides(overrides)
    for assignment in overrides:
        apply_override(data, assignment)
    config = build_config(data, str(path))
    done = state["epoch"] + (1 if state["step"] else 0)
    if config.train.epochs < done:
        raise ConfigError(
            f"train.epochs: {config.train.epochs} is below the {done} epochs this run has "
            f"already {'started' if state['step'] else 'done'} ({path})")
    return config


def _restarted_config(run_dir: Path, overrides: Sequence[str]) -> Config:
    """A run with no checkpoint yet restarts from epoch 1 with its config.yaml."""
    from mtpsl.core.config import load_config

    _check_resume_overrides(overrides)
    if (run_dir / "final_metrics.json").exists():
        raise RunFolderError(f"{run_dir} holds final metrics but no {CHECKPOINT}: "
                             "it cannot be continued")
    return load_config(str(run_dir / "config.yaml"), list(overrides))


def _check_resume_overrides(overrides: Sequence[str]) -> None:
    for assignment in overrides:
        if not assignment.startswith("train."):
            raise ConfigError(f"resume accepts only train.* overrides, got {assignment!r}")


def saved_config_difference(saved: Path, config: Config) -> str | None:
    """Dotted key at which a run folder's config.yaml first differs from ``config`` outside
    ``train.*`` (which may change on resume); None when equal or when there is no file."""
    if not saved.exists():
        return None
    from mtpsl.core.config import load_config

    on_disk = load_config(str(saved)).model_dump()
    wanted = config.model_dump()
    on_disk.pop("train"), wanted.pop("train")
    return first_difference(on_disk, wanted)


def first_difference(a, b, where: str = "") -> str | None:
    """Dotted path of the first key where two nested config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in dict.fromkeys([*a, *b]):
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if a == b else (where or "(top level)")


def _check_same(found: str | None, recorded: str | None, item: str, what: str) -> None:
    if recorded != found:
        raise RunFolderError(f"resume refused: {item} differs: {what}")


def _check_identity(exp: Experiment, found: dict, recorded: dict, run_dir: Path) -> None:
    """The split and the datasets' fingerprints must equal what the checkpoint recorded."""
    _check_same(found["split"], recorded.get("split"), "split.json",
                f"{run_dir / 'split.json'} is not the split this run was trained on")
    for name, fingerprint_found in found["datasets"].items():
        _check_same(fingerprint_found, recorded.get("datasets", {}).get(name),
                    f"dataset ({name} split)",
                    f"the files under dataset.root={exp.config.dataset.root} are not the ones "
                    f"{run_dir / CHECKPOINT} was trained with (images, labels or file sizes "
                    "changed)")


def dataset_fingerprints(exp: Experiment) -> dict[str, str]:
    return {"train": fingerprint(exp.train_set.dataset), "eval": fingerprint(exp.eval_set.dataset)}


def experiment_identity(exp: Experiment, state: dict | None = None) -> dict:
    """What a checkpoint records so that a resume can check it continues the same run, and
    the digest of the initial weights, which tells whether two runs started from the same
    weights (a paired comparison of methods on one seed): of the fresh model for a new run,
    the recorded one for a resumed run (whose fresh weights are about to be replaced)."""
    initial = (state["identity"].get("initial_weights") if state
               else payload_digest(exp.model.state_dict())[:16])
    return {"split": exp.split.digest(), "datasets": dataset_fingerprints(exp),
            "initial_weights": initial}


@dataclass
class _Step:
    """What a training step needs besides the experiment."""

    optim: Optimisation
    device: torch.device
    env: DistEnv
    scaler: torch.amp.GradScaler | None = None
    stop: StopRequest = field(default_factory=lambda: StopRequest(DistEnv(), torch.device("cpu")))
    """Set when SIGTERM/SIGUSR1 arrives (only while entered; the default never fires)."""
    clock: list[float] = field(default_factory=list)
    """Seconds of each epoch trained in this session (the ETA's basis)."""
    saved_epoch: int | None = None
    """Whole epochs in the run folder's checkpoint (None: none written yet)."""
    gramian: SharedGramian | None = None
    """The shared layers' Gram engine of ``method.weighting_gradients=gramian``."""


def prepare_training(exp: Experiment, env: DistEnv, device: torch.device) -> _Step:
    """Modules placed and sped up, optimisers, and the weighting's Gram engine: what the loop
    (and a benchmark of its step) needs before the first batch."""
    _setup_modules(exp, env, device)
    optim = build_optimisation(exp, optimizer_extra(exp.config.train, device))
    return _Step(optim, device, env, grad_scaler(exp.config.train, device),
                 StopRequest(env, device), gramian=_gramian_engine(exp, env))


def _setup_modules(exp: Experiment, env: DistEnv, device: torch.device) -> None:
    """Sync BN, device placement and the speed options, in that order."""
    cfg = exp.config.train
    check_options(cfg, device, exp.config.method.weighting)
    if cfg.sync_bn and env.enabled:
        exp.model = ddp.convert_sync_bn(exp.model, device)
    exp.model.to(device)
    exp.method.to(device)
    exp.weighting.to(device)
    prepare_model(exp.model, cfg)
    prepare_aux([exp.method, exp.weighting], cfg)


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n))
"""What cluster schedulers send before they stop a job (SLURM, Kubernetes)."""


class StopRequest:
    """SIGTERM/SIGUSR1 handlers that ask the loop to stop at the next step boundary.

    The handler only sets a flag; the loop finishes the step in progress, writes a mid-epoch
    checkpoint and raises :class:`~mtpsl.core.errors.Preempted`. Under torchrun the flag is
    agreed over processes every ``CHECK_EVERY`` steps, so all of them stop at the same step.
    """

    def __init__(self, env: DistEnv, device: torch.device) -> None:
        self.env, self.device = env, device
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, step: int) -> bool:
        """Whether to stop after optimiser step ``step`` of the epoch (agreed under torchrun
        every ``CHECK_EVERY`` optimiser steps)."""
        if not self.env.enabled:
            return self.signal is not None
        if step % CHECK_EVERY:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a stop request"


class _StopAt(Exception):
    """Internal: the loop stopped after ``steps`` steps of the epoch on a stop request."""

    def __init__(self, steps: int, sums: dict[str, torch.Tensor]) -> None:
        super().__init__(steps)
        self.steps, self.sums = steps, sums


def _fit(
    exp: Experiment,
    run_dir: Path,
    state: dict | None,
    env: DistEnv | None = None,
    device: torch.device | None = None,
    on_ready=None,
) -> dict:
    """Set up, then train from ``state`` (None: from scratch) to ``train.epochs``.

    ``on_ready(exp)`` runs once everything is built and checked, right before the first step:
    a failure before it is a set-up failure (the new run's folder is removed again).
    """
    cfg = exp.config.train
    env = env or DistEnv()
    device = device or resolve_device(cfg.device)
    identity = experiment_identity(exp, state)
    if state:
        _check_identity(exp, identity, state["identity"], run_dir)
    step = prepare_training(exp, env, device)
    start_epoch, start_step = (state["epoch"], state["step"]) if state else (0, 0)
    step.saved_epoch = start_epoch if state else None
    history = History.load(run_dir, start_epoch) if state else History(run_dir)
    if state:
        _load_training_state(exp, step, state, run_dir / CHECKPOINT)
    for module in (exp.model, exp.method, exp.weighting):
        ddp.broadcast_module(module, env)  # identical start on every process
    if env.enabled:  # independent in-step noise per process (Gumbel samples, dropout)
        torch.manual_seed(int(np.random.SeedSequence(
            [exp.config.seed, env.rank, start_epoch, start_step]).generate_state(1)[0]))
    loader = train_loader(exp, device, env.world, env.rank)
    evals = _eval_loaders(exp, device) if env.is_main else {}
    if on_ready is not None:
        on_ready(exp)
    writer = _tensorboard(run_dir, history) if env.is_main else None
    started = time.perf_counter()
    partial = state.get("partial") if state and start_step else None
    try:
        with step.stop:
            for epoch in range(start_epoch, cfg.epochs):
                first = start_step if epoch == start_epoch else 0
                _run_epoch(exp, loader, step, epoch, first, partial if first else None,
                           evals, history, writer, run_dir, identity)
    except _StopAt as stop:
        _save_preempted(exp, step, epoch, stop, run_dir, identity)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(run_dir, step.saved_epoch)) from None
    finally:
        if writer is not None:
            writer.close()
    final = None
    if env.is_main:
        final = final_metrics(exp, history, time.perf_counter() - started, device, identity)
        path = run_dir / "final_metrics.json"
        write_text(path, json.dumps(final, indent=2))
    final = _from_rank0(final, env)
    # A broadcast completes on its sender before the others have read it; tearing the group
    # down right then is the likely cause of one gloo abort seen in CI ("terminate called
    # without an active exception" in rank 0 at exit). After a barrier every process has
    # received everything.
    ddp.barrier(env)
    return final


def _load_training_state(exp: Experiment, step: _Step, state: dict, path: Path) -> None:
    load_state(exp.model, state["model"], path, "model")
    load_state(exp.method, state["method"], path, "method")
    load_state(exp.weighting, state["weighting"], path, "weighting")
    load_state(step.optim, state["optim"], path, "optimiser")
    if step.scaler is not None and state.get("scaler"):
        load_state(step.scaler, state["scaler"], path, "grad scaler")
    restore_rng_state(state["rng"], path)


def _run_epoch(exp, loader, step: _Step, epoch: int, first: int, partial, evals, history,
               writer, run_dir: Path, identity: dict) -> None:
    """Train one epoch (from step ``first``), evaluate, log, checkpoint."""
    cfg, env = exp.config.train, step.env
    done = epoch + 1
    began = time.perf_counter()
    exp.method.on_epoch_start(epoch, cfg.epochs)
    exp.train_set.set_epoch(epoch)
    loader.sampler.set_epoch(epoch)
    row = {"epoch": done, **_train_epoch(exp, loader, step, epoch, first, partial)}
    row["lr"] = step.optim.optimizers[0].param_groups[0]["lr"]
    step.optim.end_epoch()
    ddp.average_buffers(exp.model, env)  # BN running statistics for eval/checkpoint
    _require_finite_weights(exp, epoch)
    if env.is_main:
        _evaluate_and_log(exp, evals, row, history, writer, step.device)
        seconds = time.perf_counter() - began
        images = (_steps_in_epoch(exp, loader) - first) * loader.batch_size
        step.clock.append(seconds)
        print(epoch_line(row, cfg.epochs, images * env.world / seconds,
                         _eta(step.clock, cfg.epochs - done), exp.tasks),
              file=sys.stderr, flush=True)
        fault_point("epoch")
        stopping = step.stop.signal is not None
        if done % cfg.checkpoint_every == 0 or done == cfg.epochs or stopping:
            save_checkpoint(_state(exp, step, done, identity), run_dir / CHECKPOINT)
            step.saved_epoch = done
    ddp.barrier(env)  # the checkpoint is complete before any process goes on
    if step.stop.signal is not None and done < cfg.epochs:
        raise Preempted(_preempted_message(step.stop, run_dir, done, 0))


def _steps_in_epoch(exp: Experiment, loader) -> int:
    cap = exp.config.train.max_steps_per_epoch
    return len(loader) if cap is None else min(len(loader), cap)


def _eta(clock: Sequence[float], epochs_left: int) -> float:
    return sum(clock) / len(clock) * epochs_left if clock else 0.0


def epoch_line(row: dict, epochs: int, images_per_s: float, eta_s: float, tasks) -> str:
    """``epoch 3/10  loss 1.234 (semantic 0.5, ...)  eval semantic/miou 0.41 ...  96 img/s
    ETA 1m20s``: one line per epoch that stays on screen (train, compare, make demo)."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/total', math.nan):.4f}"]
    losses = [f"{t} {row[f'train/{t}']:.3f}" for t in tasks if f"train/{t}" in row]
    if losses:
        parts[-1] += f" ({', '.join(losses)})"
    shown = [f"{k} {row[f'eval/{k}']:.4g}" for k in primary_keys(tasks) if f"eval/{k}" in row]
    if shown:
        parts.append("eval " + ", ".join(shown))
    minutes, seconds = divmod(round(eta_s), 60)
    parts += [f"{images_per_s:.1f} img/s", f"ETA {minutes}m{seconds:02d}s"]
    return "  ".join(parts)


def _save_preempted(exp, step: _Step, epoch: int, stop: _StopAt, run_dir: Path,
                    identity: dict) -> None:
    _require_finite_weights(exp, epoch)
    if step.env.is_main:
        state = _state(exp, step, epoch, identity, steps=stop.steps, sums=stop.sums)
        save_checkpoint(state, run_dir / CHECKPOINT)
    ddp.barrier(step.env)
    raise Preempted(_preempted_message(step.stop, run_dir, epoch, stop.steps))


def _preempted_message(stop: StopRequest, run_dir: Path, epoch: int, steps: int) -> str:
    where = f"after step {steps} of epoch {epoch + 1}" if steps else f"after epoch {epoch}"
    return (f"stopped by {stop.name()} {where}; checkpoint written to {run_dir / CHECKPOINT}; "
            f"continue with `mtpsl train --resume {run_dir}` (exit status 75)")


def _interrupted_message(run_dir: Path, epoch: int | None) -> str:
    path = run_dir / CHECKPOINT
    if epoch is None:
        return f"interrupted before the first checkpoint; {run_dir} has nothing to resume"
    return (f"interrupted; the last checkpoint is {path} (epoch {epoch}); continue with "
            f"`mtpsl train --resume {run_dir}`")


def _require_finite_weights(exp: Experiment, epoch: int) -> None:
    """No non-finite weight may reach a checkpoint: the update of the epoch's last step is
    not covered by the loss/gradient check (an infinite learning rate makes finite
    gradients into NaN weights)."""
    # the model's whole state (BN statistics too); of the method's and the weighting's only
    # the parameters: their buffers may use NaN as "not yet seen" (DWA's loss history)
    named = [*exp.model.state_dict().items(), *exp.method.named_parameters(),
             *exp.weighting.named_parameters()]
    bad = nonfinite_entries(named)
    if bad:
        raise NonFiniteLossError(
            f"training diverged in epoch {epoch + 1}: an update made weights non-finite "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) although losses and "
            "gradients were finite (check optim.lr); stopped, the last checkpoint is unchanged")


def _tensorboard(run_dir: Path, history: History) -> SummaryWriter:
    """A fresh TensorBoard log holding the history's rows: a resumed run rewrites it from
    metrics.jsonl, so epochs logged after the checkpoint are not there twice."""
    folder = run_dir / "tensorboard"
    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    for row in history.rows:
        _log_scalars(writer, row)
    return writer


def _log_scalars(writer: SummaryWriter, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and math.isfinite(value):
            writer.add_scalar(key, value, row["epoch"])


def _eval_loaders(exp: Experiment, device: torch.device) -> dict:
    evals = {"eval": eval_loader(exp.eval_set, exp.config, device)}
    if exp.val_set is not None:
        evals["val"] = eval_loader(exp.val_set, exp.config, device)
    for name, extra_set in exp.extra_evals.items():
        evals[f"eval@{name}"] = eval_loader(extra_set, exp.config, device)
    return evals


def _evaluate_and_log(exp, evals, row: dict, history: History, writer, device) -> None:
    """Evaluate every ``eval_every`` epochs (and after the last), then record the row."""
    cfg = exp.config.train
    done = row["epoch"]
    if done % cfg.eval_every == 0 or done == cfg.epochs:
        for prefix, ld in evals.items():
            metrics = evaluate(exp.model, ld, exp.tasks, device, cfg.progress, prefix,
                               amp=cfg.amp, channels_last=cfg.channels_last)
            row.update({f"{prefix}/{k}": v for k, v in metrics.items()})
    history.append(row)
    _log_scalars(writer, row)


CHECK_EVERY = 10
"""Steps between host-side checks of the device-side divergence flags (and the last step)."""


def _train_epoch(exp: Experiment, loader, run: _Step, epoch: int, first: int = 0,
                 partial: dict | None = None) -> dict:
    """One epoch from step ``first`` (a resumed preemption: ``partial`` holds the loss sums
    of the steps before it); raises :class:`NonFiniteLossError` naming the first step that
    diverged, or :class:`_StopAt` after a step when a stop was requested.

    Divergence is tracked on the device, without a host sync per step: every step marks
    whether any loss term or the gradient norm is non-finite, and the index of the first such
    step and its bad terms are kept with ``torch.where``. The flags are read (one sync) before
    the optimiser step of every ``CHECK_EVERY``-th step and of the last step, so at most
    ``CHECK_EVERY - 1`` bad updates reach the in-memory weights before the run stops; those
    weights are then discarded. The weights themselves are checked before any checkpoint is
    written, so the last good one is never overwritten.

    Distributed: gradients are averaged right after the backward pass (so the divergence
    check sees the same gradients everywhere and all processes stop together) and the
    epoch's loss means are averaged over processes. With fp16, steps whose gradients
    overflow are skipped by the GradScaler rather than reported as divergence.
    """
    cfg = exp.config.train
    exp.model.train()
    exp.method.train()
    n_steps = _steps_in_epoch(exp, loader)
    sums: dict[str, torch.Tensor] = {
        k: v.to(run.device) for k, v in ((partial or {}).get("sums") or {}).items()}
    watch = _DivergenceWatch(run.device, run.env)
    params = [p for opt in run.optim.optimizers for g in opt.param_groups for p in g["params"]]
    shared = shared_parameters(exp.model)
    show = cfg.progress and run.env.is_main
    bar = tqdm(total=n_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               leave=False, disable=None if show else True)  # None: only on a terminal
    loader.sampler.start_at(first * loader.batch_size)
    loader.generator.manual_seed(int(np.random.SeedSequence(
        [exp.config.seed, epoch, run.env.rank]).generate_state(1)[0]))
    accumulate = cfg.accumulate
    for step, batch in enumerate(loader, start=first):
        if step >= n_steps:
            break
        group_start = step - step % accumulate
        group_size = min(accumulate, n_steps - group_start)  # the last group may be shorter
        steps_now = step == group_start + group_size - 1  # the group's last micro-batch
        batch = to_channels_last(batch.to(run.device, non_blocking=True), cfg.channels_last)
        terms = _forward_backward(exp, batch, run, shared, zero=step == group_start,
                                  divisor=group_size)
        if steps_now:
            ddp.allreduce_gradients(params, run.env)
            run.optim.unscale(run.scaler)
        grads = [] if run.scaler else [p.grad for p in params if p.grad is not None]
        watch.update(step, terms, grads)
        fault_point("backward")
        if step % CHECK_EVERY == 0 or step == n_steps - 1:
            _check_finite(watch, epoch, n_steps)  # one host sync per CHECK_EVERY steps
        if steps_now:
            if cfg.clip_norm is not None:  # on the unscaled, averaged gradients of every group
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            run.optim.step(run.scaler)
            after_optimiser_step(exp, batch, run)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0) + value
        bar.update()
        if show and (step % CHECK_EVERY == 0 or step == n_steps - 1):
            bar.set_postfix(loss=f"{sums['total'].item() / (step + 1):.4f}")
        fault_point("step")
        if (steps_now and step < n_steps - 1
                and run.stop.requested(step // accumulate)):  # between optimiser steps only
            bar.close()
            raise _StopAt(step + 1, {k: v.detach().cpu() for k, v in sums.items()})
    bar.close()
    reduced = ddp.all_reduce_mean({k: v / max(n_steps, 1) for k, v in sums.items()}, run.env)
    means = {k: float(v.item()) for k, v in reduced.items()}
    exp.weighting.end_epoch({t: means[t] for t in exp.tasks if t in means})
    return {f"train/{k}": v for k, v in means.items()}


def _forward_backward(exp: Experiment, batch, run: _Step, shared, zero: bool = True,
                      divisor: int = 1) -> dict[str, torch.Tensor]:
    """Losses under autocast (in fp32: see mtpsl.engine.speed), then the weighting's backward.

    ``zero`` starts a new gradient (the first micro-batch of an optimiser step); ``divisor``
    (the step's number of micro-batches) divides what is backpropagated, not what is logged.
    With fp16 the losses handed to the weighting are multiplied by the loss scale (exact for
    the linear weightings fp16 is allowed with) and the logged total is divided back.
    """
    with autocast(exp.config.train.amp, run.device):
        losses, out = exp.method.compute(exp.model, batch)
    if zero:
        run.optim.zero_grad()
    where = _gradient_source(exp, out, run)
    task_losses = {k: v.float() for k, v in losses.tasks.items()}
    extra = sum((v.float() for v in losses.extra.values()), torch.zeros((), device=run.device))
    present = ddp.any_over_ranks(batch.labelled.any(0))  # the same on every process
    if divisor == 1 and run.scaler is None:
        total = exp.weighting.backward(task_losses, extra, shared, present, **where)
        return {"total": total, **losses.detached()}
    scale = torch.ones((), device=run.device) / divisor
    if run.scaler is not None:
        scale = run.scaler.scale(scale)  # no host sync
    scaled = {k: v * scale for k, v in task_losses.items()}
    total = exp.weighting.backward(scaled, extra * scale, shared, present, **where) / scale
    return {"total": total, **losses.detached()}


def _gramian_engine(exp: Experiment, env: DistEnv) -> SharedGramian | None:
    """The Gram engine on the shared layers when the weighting asks for it (after the model's
    set-up: the engine hooks the modules the forward pass will run)."""
    if exp.weighting.gradients != "gramian":
        return None
    if env.enabled:
        raise ConfigError("method.weighting_gradients: 'gramian' gives one process's Gram "
                          "matrix; under torchrun use 'parameters' or 'representation'")
    if exp.config.train.compile:
        raise ConfigError("method.weighting_gradients: 'gramian' hooks the shared layers, "
                          "which train.compile does not support: set train.compile=false")
    shared = shared_parameters(exp.model)
    if not shared:
        raise ConfigError(f"method.weighting_gradients: 'gramian' needs shared parameters; "
                          f"{type(exp.model).__name__} has none")
    return SharedGramian(exp.model, shared)


def _gradient_source(exp: Experiment, out, run: _Step) -> dict[str, Any]:
    """What the weighting's backward differentiates besides the losses
    (``method.weighting_gradients``): the shared representation, the Gram engine, or
    nothing."""
    if exp.weighting.gradients == "gramian":
        return {"gramian": run.gramian}
    if exp.weighting.gradients != "representation":
        return {}
    z = out.features.get("shared")
    if z is None or not z.requires_grad:
        raise ConfigError(
            f"method.weighting_gradients: 'representation' needs a model whose heads all read "
            f"one shared map (features['shared']: segnet, dense/resnet); "
            f"{type(exp.model).__name__} has none (use 'parameters')")
    return {"representation": z}


def after_optimiser_step(exp: Experiment, batch, run: _Step) -> None:
    """The method's and the weighting's hooks after an optimiser step (EMA teachers, FAMO)."""
    exp.method.after_step(exp.model)
    if exp.weighting.wants_losses_after_step:
        exp.weighting.after_step(*_losses_after_step(exp, batch, run))


def _losses_after_step(exp: Experiment, batch, run: _Step) -> tuple[dict, torch.Tensor]:
    """The batch's task losses with the updated weights, and which tasks are present (for
    strategies that learn from the step's effect): no gradient, and the model's and the
    method's buffers (BatchNorm statistics) restored, so the extra pass changes nothing else."""
    buffers = [*exp.model.buffers(), *exp.method.buffers()]
    saved = [b.detach().clone() for b in buffers]
    with torch.no_grad(), autocast(exp.config.train.amp, run.device):
        losses, _ = exp.method.compute(exp.model, batch)
    with torch.no_grad():
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
    present = ddp.any_over_ranks(batch.labelled.any(0))
    return {k: v.float() for k, v in losses.tasks.items()}, present


GRADIENTS = "gradients"


class _DivergenceWatch:
    """Device-side record of the first step with a non-finite loss term or gradient norm."""

    def __init__(self, device, env: DistEnv | None = None) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_terms: dict[str, torch.Tensor] = {}
        self.env = env or DistEnv()

    def update(self, step: int, terms: dict[str, torch.Tensor], grads: list) -> None:
        flags = {k: ~torch.isfinite(v).all() for k, v in terms.items()}
        if grads:  # max |g| per tensor: NaN/inf propagate, and it cannot overflow like an L2
            norms = torch._foreach_norm(grads, math.inf)
            flags[GRADIENTS] = ~torch.isfinite(torch.stack(norms)).all()
        any_bad = torch.stack(list(flags.values())).any()
        is_first = any_bad & (self.first_bad < 0)
        self.first_bad = torch.where(is_first, step, self.first_bad)
        false = torch.zeros((), dtype=torch.bool, device=self.first_bad.device)
        for key, bad in flags.items():
            self.bad_terms[key] = self.bad_terms.get(key, false) | (bad & is_first)

    def report(self) -> tuple[int, list[str]] | None:
        """(first bad step, bad term names) or None; this is the host sync.

        Distributed: the earliest bad step of any process, so all of them stop together.
        """
        if self.env.enabled:
            self._merge_ranks()
        step = int(self.first_bad.item())
        if step < 0:
            return None
        return step, [k for k, v in self.bad_terms.items() if bool(v.item())]


    def _merge_ranks(self) -> None:
        dist = torch.distributed
        never = torch.iinfo(torch.int64).max
        first = torch.where(self.first_bad < 0, never, self.first_bad)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        self.first_bad = torch.where(first == never, -1, first)
        if self.bad_terms:
            flags = torch.stack(list(self.bad_terms.values())).to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            self.bad_terms = dict(zip(self.bad_terms, flags.bool().unbind(), strict=True))


def _check_finite(watch: _DivergenceWatch, epoch: int, n_steps: int) -> None:
    found = watch.report()
    if found is None:
        return
    step, bad = found
    losses = [k for k in bad if k not in ("total", GRADIENTS)] or [k for k in bad if k == "total"]
    if losses:
        what = f"non-finite loss ({', '.join(losses)})"
        if GRADIENTS in bad:
            what += " and gradients"
    else:
        what = "non-finite gradients (the loss was finite)"
    raise NonFiniteLossError(
        f"training diverged at epoch {epoch + 1}, step {step + 1} of {n_steps}: {what}; "
        "stopped, the last checkpoint is unchanged"
    )


def _state(exp: Experiment, run: _Step, epoch: int, identity: dict, steps: int = 0,
           sums: dict | None = None) -> dict:
    """A checkpoint after ``epoch`` whole epochs and ``steps`` steps of the next one."""
    extra = {"scaler": run.scaler.state_dict()} if run.scaler is not None else {}
    if steps:
        extra["partial"] = {"sums": sums or {}}
    return {
        "epoch": epoch,
        "step": steps,
        "identity": identity,
        "config": exp.config.model_dump(),
        "task_names": list(exp.tasks),
        "input_size": [exp.eval_set.source.height, exp.eval_set.source.width],
        "model": exp.model.state_dict(),
        "method": exp.method.state_dict(),
        "weighting": exp.weighting.state_dict(),
        "optim": run.optim.state_dict(),
        "rng": rng_state(),
        **extra,
    }
