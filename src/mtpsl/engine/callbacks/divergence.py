"""Stop a run whose losses, gradients or weights stop being finite, before it is saved."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import MtpslError
from mtpsl.engine.callbacks.base import CHECK_EVERY, Callback, Trainer
from mtpsl.engine.checkpoint import nonfinite_entries

if TYPE_CHECKING:
    from mtpsl.engine.build import Experiment
    from mtpsl.engine.step import StepResult

GRADIENTS = "gradients"


class NonFiniteLossError(MtpslError):
    """Training diverged; the last good checkpoint is left in place."""


class DivergenceWatch(Callback):
    """Divergence is tracked on the device, without a host sync per step: every micro-batch
    marks whether any loss term or gradient is non-finite, and the index of the first such
    step and its bad terms are kept with ``torch.where``. The flags are read (one sync) before
    the optimiser step of every :data:`CHECK_EVERY`-th step and of the epoch's last step, so
    at most ``CHECK_EVERY - 1`` bad updates reach the in-memory weights before the run stops;
    those weights are then discarded. The weights themselves are checked at the end of every
    epoch and before a mid-epoch checkpoint, so the last good checkpoint is never overwritten
    (an infinite learning rate turns finite gradients into NaN weights).

    Distributed: the gradients are the averaged ones, and the first bad step is agreed over
    processes, so all of them stop together. With fp16 the GradScaler skips steps whose
    gradients overflow instead (the gradients are not checked).
    """

    def __init__(self) -> None:
        self.flags: _Flags | None = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.flags = _Flags(trainer.device, trainer.env)

    def on_after_backward(self, trainer: Trainer, result: StepResult) -> None:
        assert self.flags is not None
        self.flags.update(result.index, result.terms, trainer.step.gradients())
        if result.index % CHECK_EVERY == 0 or result.last:
            check_finite(self.flags, trainer.epoch, result.steps)

    def on_train_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        require_finite_weights(trainer.exp, trainer.epoch)

    def on_stop(self, trainer: Trainer, steps: int) -> None:
        require_finite_weights(trainer.exp, trainer.epoch)


class _Flags:
    """Device-side record of the first step with a non-finite loss term or gradient."""

    def __init__(self, device: torch.device | str, env: DistEnv | None = None) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_terms: dict[str, Tensor] = {}
        self.env = env or DistEnv()

    def update(self, step: int, terms: dict[str, Tensor], grads: list[Tensor]) -> None:
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


def check_finite(flags: _Flags, epoch: int, n_steps: int) -> None:
    """Raise :class:`NonFiniteLossError` naming the first step that diverged, if any."""
    found = flags.report()
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


def require_finite_weights(exp: Experiment, epoch: int) -> None:
    """No non-finite weight may reach a checkpoint: the update of the epoch's last step is
    not covered by the loss/gradient check."""
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
