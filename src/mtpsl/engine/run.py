"""Runs: a new one in a fresh run folder (:func:`train`), or an existing one continued from
its checkpoint (:func:`resume`); both set up the :class:`~mtpsl.engine.trainer.Trainer`.

A run folder holds everything needed to understand and reproduce the run: the resolved
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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from mtpsl.core import distributed as ddp
from mtpsl.core.config import Config, apply_override, build_config, load_config, save_config
from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import ConfigError, RunFolderError
from mtpsl.core.files import write_text
from mtpsl.core.rundir import RunLock, claim_new
from mtpsl.data.fingerprint import fingerprint
from mtpsl.data.splits import Split
from mtpsl.engine.build import Experiment, build_experiment, resolve_device, seed_everything
from mtpsl.engine.callbacks import Callback, build_callbacks, default_callbacks
from mtpsl.engine.checkpoint import (
    CHECKPOINT,
    RESUME_KEYS,
    load_checkpoint,
    load_state,
    payload_digest,
    restore_rng_state,
)
from mtpsl.engine.guards import warn_about_setup
from mtpsl.engine.history import History
from mtpsl.engine.speed import SpeedChoice, resolve_speed
from mtpsl.engine.step import TrainStep, prepare_training
from mtpsl.engine.summary import final_metrics
from mtpsl.engine.teacher import load_teacher
from mtpsl.engine.trainer import Trainer


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


def train(config: Config, run_dir: str | Path | None = None,
          callbacks: Sequence[Callback] = ()) -> dict:
    """Train a new run (in ``run_dir`` or a fresh folder) and return its final metrics.

    The folder is locked for the whole run and must not hold another run. A run that fails
    before its first training step (a config or data error, a batch larger than the data)
    leaves nothing behind. Under torchrun, rank 0 picks, locks and fills the run folder and
    every process returns the same final metrics. ``callbacks`` join the config's own
    (``train.callbacks``) after the built-in hooks.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    env, device, owned = _start(config)
    claim = None
    started = False

    def write_start_files(exp: Experiment) -> None:
        nonlocal started
        if env.is_main:
            assert isinstance(run_dir, Path)  # claimed before the experiment is built
            save_config(config, run_dir / "config.yaml")
            exp.split.save(run_dir / "split.json")
        started = True

    try:
        with ddp.peer_errors(env):  # a peer lost outside the training loop
            speed = resolve_speed(config, device, env)  # auto -> this machine's, first
            if env.is_main:
                claim = claim_new(run_dir) if run_dir else claim_new(new_run_dir(config), True)
                run_dir = claim.run_dir
            run_dir = Path(_from_rank0(str(run_dir), env))
            seed_everything(config.seed, config.train.deterministic)
            exp = build_experiment(config)
            return _fit(exp, run_dir, None, env, device, callbacks, write_start_files, speed)
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
    device = ddp.setup(env, resolve_device(config.train.device), config.train.dist_timeout_s)
    return env, device, env.enabled and not was_up


def _from_rank0(value, env: DistEnv):
    """Rank 0's ``value`` on every process (a picklable object)."""
    if not env.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resume(run_dir: str | Path, overrides: Sequence[str] = (),
           callbacks: Sequence[Callback] = ()) -> dict:
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
            with ddp.peer_errors(env):
                speed = resolve_speed(config, device, env)  # a recorded precision stays
                seed_everything(config.seed, config.train.deterministic)
                split_path = run_dir / "split.json"
                # a restart killed before split.json was written draws the same split again
                split = Split.load(split_path) if state or split_path.exists() else None
                exp = build_experiment(config, split)
                if env.is_main:
                    save_config(config, run_dir / "config.yaml")
                    if split is None:
                        exp.split.save(split_path)
                return _fit(exp, run_dir, state, env, device, callbacks, speed=speed)
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


def _fit(exp: Experiment, run_dir: Path, state: dict | None, env: DistEnv,
         device: torch.device, callbacks: Sequence[Callback] = (),
         on_ready: Callable[[Experiment], None] | None = None,
         speed: SpeedChoice | None = None) -> dict:
    """Set up, then train from ``state`` (None: from scratch) to ``train.epochs``; returns
    the final metrics (every process: rank 0's), with ``run_dir`` added (not in the file).

    ``on_ready(exp)`` runs once everything is built and checked, right before the first step:
    a failure before it is a set-up failure (the new run's folder is removed again). The
    ``speed`` choice is announced then too (after every check of the set-up).
    """
    if not state:  # a resumed run restores its teacher with the method's state
        load_teacher(exp.method, exp.config, exp.tasks)
    identity = experiment_identity(exp, state)
    if state:
        _check_identity(exp, identity, state["identity"], run_dir)
    step = prepare_training(exp, env, device)
    history = History.load(run_dir, state["epoch"]) if state else History(run_dir)
    if state:
        load_training_state(step, state, run_dir / CHECKPOINT)
    for module in (exp.model, exp.method, exp.weighting):
        ddp.broadcast_module(module, env)  # identical start on every process
    if env.enabled:  # independent in-step noise per process (Gumbel samples, dropout)
        start = (state["epoch"], state["step"]) if state else (0, 0)
        torch.manual_seed(int(np.random.SeedSequence(
            [exp.config.seed, env.rank, *start]).generate_state(1)[0]))
    own = [*build_callbacks(exp.config), *callbacks]
    trainer = Trainer(step, run_dir, default_callbacks(history, env.is_main, own), identity,
                      state)
    if env.is_main:
        print(f"run folder: {run_dir}", file=sys.stderr, flush=True)
        if speed is not None:
            speed.announce(device)
        if state is None:  # once per run, not again on resume
            warn_about_setup(exp)
    if on_ready is not None:
        on_ready(exp)
    started = time.perf_counter()
    trainer.fit()
    final = None
    if env.is_main:
        final = final_metrics(exp, history, time.perf_counter() - started, device, identity)
        write_text(run_dir / "final_metrics.json", json.dumps(final, indent=2))
    final = {**_from_rank0(final, env), "run_dir": str(run_dir)}
    # A broadcast completes on its sender before the others have read it; tearing the group
    # down right then is the likely cause of one gloo abort seen in CI ("terminate called
    # without an active exception" in rank 0 at exit). After a barrier every process has
    # received everything.
    ddp.barrier(env)
    return final


def load_training_state(step: TrainStep, state: dict, path: Path) -> None:
    """The model, method, weighting, optimisers, loss scale and RNG of a checkpoint."""
    exp = step.exp
    load_state(exp.model, state["model"], path, "model")
    load_state(exp.method, state["method"], path, "method")
    load_state(exp.weighting, state["weighting"], path, "weighting")
    load_state(step.optim, state["optim"], path, "optimiser")
    if step.scaler is not None and state.get("scaler"):
        load_state(step.scaler, state["scaler"], path, "grad scaler")
    restore_rng_state(state["rng"], path)
