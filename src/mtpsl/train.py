"""The training loop: schedule -> step -> evaluate -> log -> checkpoint, top to bottom.

A run directory holds everything needed to understand and reproduce the run: the resolved
config, the label split, per-epoch metrics (CSV and JSON lines), TensorBoard logs, the last
checkpoint (written atomically) and the final metrics. The reported result is always the last
epoch's on the evaluation split; a best epoch is only ever chosen on a validation split carved
from the training images, and is labelled as such.

Under ``torchrun`` every process trains on its shard of the training set and gradients are
averaged over processes (see :mod:`mtpsl.distributed`); only rank 0 evaluates, logs and
writes files. Speed options (``train.amp``, ``channels_last``, ``compile``...) are applied by
:mod:`mtpsl.speed`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from . import distributed as ddp
from .checkpoint import atomic_write, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from .config import Config, apply_override, build_config, save_config
from .distributed import DistEnv
from .errors import ConfigError, MtpslError
from .evaluate import evaluate, higher_is_better, primary_keys
from .experiment import (
    Experiment,
    build_experiment,
    eval_loader,
    resolve_device,
    seed_everything,
    train_loader,
)
from .models import count_parameters, shared_parameters
from .optim import Optimisation
from .speed import (
    autocast,
    check_options,
    grad_scaler,
    optimizer_extra,
    prepare_aux,
    prepare_model,
    to_channels_last,
)
from .splits import Split

CHECKPOINT = "checkpoint.pt"


class NonFiniteLossError(MtpslError):
    """Training diverged; the last good checkpoint is left in place."""


def build_optimisation(exp: Experiment, defaults: dict | None = None) -> Optimisation:
    """The method's groups, the weighting's own groups, and its other parameters in "main"."""
    groups = exp.method.optimizer_groups(exp.model)
    own = exp.weighting.optimizer_groups()
    owned = {id(p) for g in own for p in g.params}
    groups[0].params.extend(p for p in exp.weighting.parameters() if id(p) not in owned)
    cfg = exp.config
    return Optimisation.build([*groups, *own], cfg.optim, cfg.train.epochs, defaults)


@dataclass
class History:
    """Per-epoch rows, mirrored to metrics.jsonl and metrics.csv after every epoch."""

    run_dir: Path
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path, upto_epoch: int) -> History:
        path = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return cls(run_dir, [r for r in rows if r["epoch"] <= upto_epoch])

    def append(self, row: dict) -> None:
        self.rows.append(row)
        lines = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write(self.run_dir / "metrics.jsonl", lambda f: f.write(lines.encode()))
        columns = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def last_eval(self) -> dict | None:
        rows = [r for r in self.rows if any(k.startswith("eval/") for k in r)]
        return rows[-1] if rows else None


def new_run_dir(config: Config) -> Path:
    """``output_dir/name``, suffixed ``-1``, ``-2``... so an old run is never overwritten."""
    base = Path(config.output_dir) / config.name
    path, k = base, 0
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    path.mkdir(parents=True)
    return path


def train(config: Config, run_dir: Path | None = None) -> dict:
    """Train a new run (in ``run_dir`` or a fresh folder) and return its final metrics.

    Under torchrun, rank 0 picks and fills the run folder and every process returns the
    same final metrics.
    """
    env, device, owned = _start(config)
    try:
        if env.is_main:
            run_dir = Path(run_dir) if run_dir else new_run_dir(config)
            run_dir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(_from_rank0(str(run_dir), env))
        seed_everything(config.seed, config.train.deterministic)
        try:
            exp = build_experiment(config)
        except MtpslError:
            if env.is_main and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a config or data error leaves no empty run folder behind
            raise
        if env.is_main:
            save_config(config, run_dir / "config.yaml")
            exp.split.save(run_dir / "split.json")
        return _fit(exp, run_dir, 0, None, env, device)
    finally:
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
    """Continue a run from its last checkpoint with its saved config and split.

    Only ``train.*`` keys may be overridden (e.g. ``train.epochs=300`` to train longer): the
    rest defines the experiment and must not change halfway through it.
    """
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / CHECKPOINT)
    data = state["config"]
    for assignment in overrides:
        if not assignment.startswith("train."):
            raise ConfigError(f"resume accepts only train.* overrides, got {assignment!r}")
        apply_override(data, assignment)
    config = build_config(data, str(run_dir / CHECKPOINT))
    env, device, owned = _start(config)
    try:
        if env.is_main:
            save_config(config, run_dir / "config.yaml")
        seed_everything(config.seed, config.train.deterministic)
        split = Split.load(run_dir / "split.json")
        exp = build_experiment(config, split)
        return _fit(exp, run_dir, state["epoch"], state, env, device)
    finally:
        if owned:
            ddp.teardown(env)


@dataclass
class _Step:
    """What a training step needs besides the experiment."""

    optim: Optimisation
    device: torch.device
    env: DistEnv
    scaler: torch.amp.GradScaler | None = None


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


def _fit(
    exp: Experiment,
    run_dir: Path,
    start_epoch: int,
    state: dict | None,
    env: DistEnv | None = None,
    device: torch.device | None = None,
) -> dict:
    cfg = exp.config.train
    env = env or DistEnv()
    device = device or resolve_device(cfg.device)
    _setup_modules(exp, env, device)
    optim = build_optimisation(exp, optimizer_extra(cfg, device))
    step = _Step(optim, device, env, grad_scaler(cfg, device))
    history = History.load(run_dir, start_epoch) if state else History(run_dir)
    if state:
        exp.model.load_state_dict(state["model"])
        exp.method.load_state_dict(state["method"])
        exp.weighting.load_state_dict(state["weighting"])
        optim.load_state_dict(state["optim"])
        if step.scaler is not None and state.get("scaler"):
            step.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
    for module in (exp.model, exp.method, exp.weighting):
        ddp.broadcast_module(module, env)  # identical start on every process
    if env.enabled:  # independent in-step noise per process (Gumbel samples, dropout)
        torch.manual_seed(int(np.random.SeedSequence(
            [exp.config.seed, env.rank, start_epoch]).generate_state(1)[0]))
    loader = train_loader(exp, device, env.world, env.rank)
    evals = _eval_loaders(exp, device) if env.is_main else {}
    writer = SummaryWriter(str(run_dir / "tensorboard")) if env.is_main else None
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            done = epoch + 1
            exp.method.on_epoch_start(epoch, cfg.epochs)
            exp.train_set.set_epoch(epoch)
            loader.sampler.set_epoch(epoch)
            row = {"epoch": done, **_train_epoch(exp, loader, step, epoch)}
            row["lr"] = optim.optimizers[0].param_groups[0]["lr"]
            optim.end_epoch()
            ddp.average_buffers(exp.model, env)  # BN running statistics for eval/checkpoint
            if env.is_main:
                _evaluate_and_log(exp, evals, row, history, writer, device)
                if done % cfg.checkpoint_every == 0 or done == cfg.epochs:
                    save_checkpoint(_state(exp, step, done), run_dir / CHECKPOINT)
            ddp.barrier(env)  # the checkpoint is complete before any process goes on
    finally:
        if writer is not None:
            writer.close()
    final = None
    if env.is_main:
        final = _final_metrics(exp, history, time.perf_counter() - started)
        path = run_dir / "final_metrics.json"
        atomic_write(path, lambda f: f.write(json.dumps(final, indent=2).encode()))
    return _from_rank0(final, env)


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
    for key, value in row.items():
        if key != "epoch" and math.isfinite(value):
            writer.add_scalar(key, value, done)


CHECK_EVERY = 10
"""Steps between host-side checks of the device-side divergence flags (and the last step)."""


def _train_epoch(exp: Experiment, loader, run: _Step, epoch: int) -> dict:
    """One epoch; raises :class:`NonFiniteLossError` naming the first step that diverged.

    Divergence is tracked on the device, without a host sync per step: every step marks
    whether any loss term or the gradient norm is non-finite, and the index of the first such
    step and its bad terms are kept with ``torch.where``. The flags are read (one sync) before
    the optimiser step of every ``CHECK_EVERY``-th step and of the last step, so at most
    ``CHECK_EVERY - 1`` bad updates reach the in-memory weights before the run stops; those
    weights are then discarded. The checkpoint is only written after an epoch that finished
    clean, so the last good one is never overwritten.

    Distributed: gradients are averaged right after the backward pass (so the divergence
    check sees the same gradients everywhere and all processes stop together) and the
    epoch's loss means are averaged over processes. With fp16, steps whose gradients
    overflow are skipped by the GradScaler rather than reported as divergence.
    """
    cfg = exp.config.train
    exp.model.train()
    exp.method.train()
    n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(
        len(loader), cfg.max_steps_per_epoch
    )
    sums: dict[str, torch.Tensor] = {}
    watch = _DivergenceWatch(run.device, run.env)
    params = [p for opt in run.optim.optimizers for g in opt.param_groups for p in g["params"]]
    shared = shared_parameters(exp.model)
    show = cfg.progress and run.env.is_main
    bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
    for step, batch in enumerate(loader):
        if step >= n_steps:
            break
        batch = to_channels_last(batch.to(run.device, non_blocking=True), cfg.channels_last)
        terms = _forward_backward(exp, batch, run, shared)
        ddp.allreduce_gradients(params, run.env)
        run.optim.unscale(run.scaler)
        grads = [] if run.scaler else [p.grad for p in params if p.grad is not None]
        watch.update(step, terms, grads)
        if step % CHECK_EVERY == 0 or step == n_steps - 1:
            _check_finite(watch, epoch, n_steps)  # one host sync per CHECK_EVERY steps
        run.optim.step(run.scaler)
        for key, value in terms.items():
            sums[key] = sums.get(key, 0) + value
        bar.update()
        if show and (step % CHECK_EVERY == 0 or step == n_steps - 1):
            bar.set_postfix(loss=f"{sums['total'].item() / (step + 1):.4f}")
    bar.close()
    means = ddp.all_reduce_mean({k: v / max(n_steps, 1) for k, v in sums.items()}, run.env)
    means = {k: v.item() for k, v in means.items()}
    exp.weighting.end_epoch({t: means[t] for t in exp.tasks if t in means})
    return {f"train/{k}": v for k, v in means.items()}


def _forward_backward(exp: Experiment, batch, run: _Step, shared) -> dict[str, torch.Tensor]:
    """Losses under autocast (in fp32: see mtpsl.speed), then the weighting's backward.

    With fp16 the losses handed to the weighting are multiplied by the loss scale (exact for
    the linear weightings fp16 is allowed with) and the logged total is divided back.
    """
    with autocast(exp.config.train.amp, run.device):
        losses, _ = exp.method.compute(exp.model, batch)
    run.optim.zero_grad()
    task_losses = {k: v.float() for k, v in losses.tasks.items()}
    extra = sum((v.float() for v in losses.extra.values()), torch.zeros((), device=run.device))
    present = batch.labelled.any(0)
    if run.scaler is None:
        total = exp.weighting.backward(task_losses, extra, shared, present)
    else:
        scale = run.scaler.scale(torch.ones((), device=run.device))  # no host sync
        scaled = {k: v * scale for k, v in task_losses.items()}
        total = exp.weighting.backward(scaled, extra * scale, shared, present) / scale
    return {"total": total, **losses.detached()}


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


def _state(exp: Experiment, run: _Step, epoch: int) -> dict:
    extra = {"scaler": run.scaler.state_dict()} if run.scaler is not None else {}
    return {
        "epoch": epoch,
        "config": exp.config.model_dump(),
        "task_names": list(exp.tasks),
        "input_size": [exp.eval_set.dataset.height, exp.eval_set.dataset.width],
        "model": exp.model.state_dict(),
        "method": exp.method.state_dict(),
        "weighting": exp.weighting.state_dict(),
        "optim": run.optim.state_dict(),
        "rng": rng_state(),
        **extra,
    }


def _final_metrics(exp: Experiment, history: History, seconds: float) -> dict:
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
        **_split_counts(exp),
        "parameters": count_parameters(exp.model),
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


def _split_counts(exp: Experiment) -> dict:
    """``split``: labelled images per task that training can see (the regime's labels that
    also exist in the data), and ``split_detail``: the regime's own counts, per-source counts
    for cross-dataset data, and how they were counted.

    The regime alone (e.g. ``full``) would claim labels a source never provides. Which labels
    exist comes from the dataset's ``available`` ``[N, T]`` array, filled from file listings
    when it was opened (no label is decoded here); a dataset without one falls back to the
    regime's counts, with a note saying so.
    """
    split = exp.split
    dataset = _unwrap(exp.train_set.dataset)
    available = label_availability(dataset, len(split), split.task_names)
    detail: dict = {"images": len(split), "labelled_by_regime": split.counts()}
    if exp.val_set is not None:
        detail["carved_for_validation"] = len(exp.val_set)
    if available is None:
        detail["note"] = (f"{type(dataset).__name__} does not list which labels exist (no "
                          "available [N, T] array): the counts are the regime's")
        return {"split": split.counts(), "split_detail": detail}
    per_source = _per_source_counts(dataset, split, available)
    if per_source:
        detail["per_source"] = per_source
    detail["note"] = ("images of the training split (split.json) whose label the regime "
                      "gives and the data has" + (", validation carve included"
                                                  if exp.val_set is not None else ""))
    return {"split": split.counts(available), "split_detail": detail}


def _unwrap(dataset):
    """The dataset under any ``Subset`` (the split's rows are its images)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def label_availability(dataset, n_images: int, task_names: Sequence[str]) -> np.ndarray | None:
    """Which labels exist, bool ``[N, T]`` in ``task_names`` order, or None when unknown.

    Read from the dataset's ``available`` array (layout, PASCAL-Context and cross-domain
    datasets fill it from their file listings); None where there is none, or it does not
    match the split's images and tasks.
    """
    available = getattr(dataset, "available", None)
    names = tuple(getattr(dataset, "task_names", task_names))
    if not isinstance(available, np.ndarray) or names != tuple(task_names):
        return None
    if available.shape != (n_images, len(task_names)):
        return None
    return available.astype(bool)


def _per_source_counts(dataset, split: Split, available: np.ndarray) -> dict:
    """Cross-dataset data: ``{source: {"images": n, task: count, ...}}``; {} otherwise."""
    ids = getattr(dataset, "domain_ids", None)
    names = getattr(dataset, "domain_names", None)
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
