"""The training loop, top to bottom: epochs -> steps -> evaluate -> callbacks.

:meth:`Trainer.fit` trains an experiment from where it stands (a fresh model, or a loaded
checkpoint's epoch and step) to ``train.epochs``. What is not the loop itself is a callback
(:mod:`mtpsl.engine.callbacks`): the metrics files, TensorBoard, the console line, checkpoints,
preemption, the divergence watch, and the method's and the weighting's hooks. Under
``torchrun`` every process runs the loop on its shard; only the process that evaluates (rank
0) has the callbacks that write files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtpsl.core import distributed as ddp
from mtpsl.core.errors import CheckpointError, Interrupted, NonFiniteResultError, Preempted
from mtpsl.core.faults import fault_point
from mtpsl.data.sampling import ResumableSampler
from mtpsl.engine.build import eval_loader, train_loader
from mtpsl.engine.callbacks.base import Callback, CallbackList
from mtpsl.engine.callbacks.divergence import NonFiniteLossError
from mtpsl.engine.card import model_card
from mtpsl.engine.checkpoint import CHECKPOINT, rng_state
from mtpsl.engine.evaluate import evaluate
from mtpsl.engine.speed import to_channels_last
from mtpsl.engine.step import MicroBatch, StepResult, TrainStep


class _StopAt(Exception):
    """Internal: the loop stopped after ``steps`` steps of the epoch on a stop request."""

    def __init__(self, steps: int) -> None:
        super().__init__(steps)
        self.steps = steps


class Trainer:
    """Trains ``step.exp`` with ``callbacks``, from ``state`` (a checkpoint: its epoch, its
    step within the epoch and the loss sums of the steps before it) or from scratch."""

    def __init__(self, step: TrainStep, run_dir: Path, callbacks: Sequence[Callback],
                 identity: dict, state: dict[str, Any] | None = None) -> None:
        self.step, self.exp, self.run_dir, self.identity = step, step.exp, run_dir, identity
        self.cfg, self.env, self.device = self.exp.config.train, step.env, step.device
        self.callbacks = CallbackList(callbacks)
        self.start_epoch: int = state["epoch"] if state else 0
        self.start_step: int = state["step"] if state else 0
        self.resumed_sums = ((state or {}).get("partial") or {}).get("sums")
        self.loader = train_loader(self.exp, self.device, self.env.world, self.env.rank)
        sampler, generator = self.loader.sampler, self.loader.generator
        assert isinstance(sampler, ResumableSampler) and generator is not None
        self.sampler, self.generator = sampler, generator
        if self.start_step >= max(self.steps_in_epoch, 1):
            # a mid-epoch checkpoint lies before its epoch's last step; a larger count would
            # resume into an empty epoch (loss nan, negative speed)
            raise CheckpointError(
                f"{run_dir / CHECKPOINT}: checkpoint entry 'step' is {self.start_step}, but an "
                f"epoch of this run has {self.steps_in_epoch} steps (train.batch_size="
                f"{self.cfg.batch_size}, train.max_steps_per_epoch="
                f"{self.cfg.max_steps_per_epoch})")
        self.evals = self._eval_loaders() if self.env.is_main else {}
        self.card = model_card(self.exp)
        """What rebuilds the model and its tasks without the training data (checked now, not
        at the first checkpoint)."""
        self.epoch = self.start_epoch
        self.first_step = 0
        """The epoch's first step in this session (a resumed epoch starts later)."""
        self.sums: dict[str, Tensor] = {}
        """The epoch's running sums of every loss term, on the device."""
        self.stop_reason: str | None = None
        self.saved_epoch: int | None = self.start_epoch if state else None
        """Whole epochs in the run folder's checkpoint (None: none written yet)."""
        if state:
            self.callbacks.load_state_dict(state.get("callbacks", {}))

    @property
    def steps_in_epoch(self) -> int:
        cap = self.cfg.max_steps_per_epoch
        return len(self.loader) if cap is None else min(len(self.loader), cap)

    def request_stop(self, reason: str) -> None:
        """Stop at the next optimiser step with a mid-epoch checkpoint (or after this epoch's
        checkpoint), exit status 75, resumable: what a preempted cluster job does."""
        self.stop_reason = reason

    def fit(self) -> None:
        """Train to ``train.epochs``; raises Preempted after a stop request, Interrupted on
        Ctrl-C (naming the last checkpoint)."""
        self.callbacks.on_fit_start(self)
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self.epoch = epoch
                self.run_epoch(self.start_step if epoch == self.start_epoch else 0)
        except _StopAt as stop:
            self.callbacks.on_stop(self, stop.steps)
            ddp.barrier(self.env)
            self._ending()
            raise Preempted(self._preempted(stop.steps)) from None
        except Preempted:  # after an epoch's checkpoint
            self._ending()
            raise
        except KeyboardInterrupt as error:
            self.callbacks.on_exception(self, error)
            raise Interrupted(self._interrupted()) from None
        except BaseException as error:
            self.callbacks.on_exception(self, error)
            lost = ddp.peer_failure(error, self.env, self._resumable())
            if lost is not None:  # a peer process ended or stopped: one line, no traceback
                self._ending()
                raise lost from None
            raise
        finally:
            self.callbacks.on_fit_end(self)

    def run_epoch(self, first: int) -> None:
        """Train one epoch from step ``first``, evaluate when due, let the callbacks log and
        checkpoint; all processes finish the epoch together."""
        done = self.epoch + 1
        self.first_step = first
        self.callbacks.on_epoch_start(self)
        self.exp.train_set.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        row: dict[str, Any] = {"epoch": done, **self.train_steps(first)}
        row["lr"] = self.step.optim.optimizers[0].param_groups[0]["lr"]
        self.step.optim.end_epoch()
        ddp.average_buffers(self.exp.model, self.env)  # BN statistics for eval/checkpoint
        self.callbacks.on_train_epoch_end(self, row)
        if self.env.is_main and (done % self.cfg.eval_every == 0 or done == self.cfg.epochs):
            metrics = self.evaluate()
            row.update(metrics)
            self.callbacks.on_eval_end(self, metrics)
        self.callbacks.on_epoch_end(self, row)
        ddp.barrier(self.env)  # the checkpoint is complete before any process goes on
        if self.stop_reason is not None and done < self.cfg.epochs:
            raise Preempted(self._preempted(0))

    def train_steps(self, first: int) -> dict[str, float]:
        """The epoch's steps from ``first``; returns ``train/<term>`` means over the epoch's
        steps and the processes."""
        exp, step, cfg = self.exp, self.step, self.cfg
        exp.model.train()
        exp.method.train()
        n_steps = self.steps_in_epoch
        self.sums = {k: v.to(self.device) for k, v in (self.resumed_sums or {}).items()
                     } if first else {}
        self.sampler.start_at(first * cfg.batch_size)
        self.generator.manual_seed(int(np.random.SeedSequence(
            [exp.config.seed, self.epoch, self.env.rank]).generate_state(1)[0]))
        for index, batch in enumerate(self.loader, start=first):
            if index >= n_steps:
                break
            micro = MicroBatch.at(index, n_steps, cfg.accumulate)
            batch = to_channels_last(batch.to(self.device, non_blocking=True),
                                     cfg.channels_last)
            terms = step.forward_backward(batch, zero=micro.first, divisor=micro.size)
            if micro.last:
                step.reduce_gradients()
            result = StepResult(index, n_steps, terms, batch, updates=micro.last)
            fault_point("backward")
            self.callbacks.on_after_backward(self, result)
            if micro.last:
                step.update()
                self.callbacks.on_optimizer_step(self, result)
            for key, value in terms.items():
                self.sums[key] = self.sums.get(key, 0) + value
            fault_point("step")
            self.callbacks.on_step_end(self, result)
            if self.stop_reason is not None and micro.last and not result.last:
                raise _StopAt(index + 1)  # between optimiser steps only
        means = ddp.all_reduce_mean({k: v / max(n_steps, 1) for k, v in self.sums.items()},
                                    self.env)
        return {f"train/{k}": float(v.item()) for k, v in means.items()}

    def evaluate(self) -> dict[str, float]:
        """Every evaluation set's metrics, as ``<set>/<task>/<metric>``.

        A non-finite evaluation means the run diverged (weights huge but finite pass the
        divergence watch): it raises :class:`NonFiniteLossError` before the epoch's row is
        logged or checkpointed, so the last good checkpoint and no ``final_metrics.json``
        remain."""
        exp, cfg = self.exp, self.cfg
        metrics = {}
        for prefix, loader in self.evals.items():
            try:
                scores = evaluate(exp.model, loader, exp.tasks, self.device, cfg.progress,
                                  prefix, amp=cfg.amp, channels_last=cfg.channels_last)
            except NonFiniteResultError as err:
                raise NonFiniteLossError(
                    f"training diverged: the evaluation after epoch {self.epoch + 1} is "
                    f"non-finite ({err.summary(f'{prefix}/')}) although the weights are "
                    f"finite (check optim.lr); stopped, {self._last_checkpoint()}"
                ) from None
            metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
        return metrics

    def _last_checkpoint(self) -> str:
        if self.saved_epoch is None:
            return "no checkpoint was written"
        return (f"the last checkpoint ({self.run_dir / CHECKPOINT}, epoch {self.saved_epoch}) "
                "is unchanged")

    def state_dict(self, epoch: int, steps: int = 0) -> dict[str, Any]:
        """A checkpoint after ``epoch`` whole epochs and ``steps`` steps of the next one."""
        exp, step = self.exp, self.step
        extra: dict[str, Any] = {}
        if step.scaler is not None:
            extra["scaler"] = step.scaler.state_dict()
        if steps:
            extra["partial"] = {"sums": {k: v.detach().cpu() for k, v in self.sums.items()}}
        callbacks = self.callbacks.state_dict()
        if callbacks:
            extra["callbacks"] = callbacks
        return {
            "epoch": epoch,
            "step": steps,
            "identity": self.identity,
            "config": exp.config.model_dump(),
            "task_names": list(exp.tasks),
            "input_size": [exp.eval_set.source.height, exp.eval_set.source.width],
            "model_card": self.card,
            "model": exp.model.state_dict(),
            "method": exp.method.state_dict(),
            "weighting": exp.weighting.state_dict(),
            "optim": step.optim.state_dict(),
            "rng": rng_state(),
            **extra,
        }

    def _eval_loaders(self) -> dict[str, torch.utils.data.DataLoader]:
        exp = self.exp
        evals = {"eval": eval_loader(exp.eval_set, exp.config, self.device)}
        if exp.val_set is not None:
            evals["val"] = eval_loader(exp.val_set, exp.config, self.device)
        for name, extra_set in exp.extra_evals.items():
            evals[f"eval@{name}"] = eval_loader(extra_set, exp.config, self.device)
        return evals

    def _preempted(self, steps: int) -> str:
        where = (f"after step {steps} of epoch {self.epoch + 1}" if steps
                 else f"after epoch {self.epoch + 1}")
        return (f"stopped by {self.stop_reason or 'a stop request'} {where}; checkpoint "
                f"written to {self.run_dir / CHECKPOINT}; continue with `mtpsl train --resume "
                f"{self.run_dir}` (exit status 75)")

    def _ending(self) -> None:
        """Under torchrun, SIGTERM is ignored once this process is ending with its report and
        status: torchrun sends it to every worker as soon as the first one exits, and it
        would otherwise kill the others on their way out (status -15 instead of 75)."""
        if self.env.enabled:
            ddp.ignore_termination()

    def _resumable(self) -> str:
        """Where a run stopped by a lost peer continues (rank 0 knows its checkpoints)."""
        if not self.env.is_main:  # only rank 0 knows which epoch its checkpoint holds
            return (f"continue from the last checkpoint with `torchrun ... mtpsl train "
                    f"--resume {self.run_dir}`")
        if self.saved_epoch is None:
            return "no checkpoint was written yet"
        return (f"the last checkpoint is {self.run_dir / CHECKPOINT} (epoch "
                f"{self.saved_epoch}); continue with `torchrun ... mtpsl train --resume "
                f"{self.run_dir}`")

    def _interrupted(self) -> str:
        path = self.run_dir / CHECKPOINT
        if self.saved_epoch is None:
            return f"interrupted before the first checkpoint; {self.run_dir} has nothing to resume"
        return (f"interrupted; the last checkpoint is {path} (epoch {self.saved_epoch}); "
                f"continue with `mtpsl train --resume {self.run_dir}`")
