"""Training one grid cell, wherever it runs: in the compare process, in a process of its own
(``python -m mtpsl.analysis.launch OUT CELL``, the local launcher's ``--jobs N``) or in a
submitit job (:class:`CellJob`, on a cluster node).

Each records ``started`` / ``stopped`` / ``failed`` / ``done`` in the cell's event log (see
:mod:`mtpsl.analysis.launch.state`) and trains with :func:`mtpsl.analysis.grid
.train_or_continue`, so a cell is the same run however it is launched: a preempted cell
continues from its mid-epoch checkpoint, bitwise. ``MTPSL_JOB_ID`` names the job to the
run's environment block (``final_metrics.json``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtpsl.analysis.grid import Cell, cell_config_for, train_or_continue, write_results
from mtpsl.analysis.launch.state import here, read_manifest, record, tables_lock
from mtpsl.core.config import Config, build_config
from mtpsl.core.distributed import env_from_torchrun
from mtpsl.core.errors import Interrupted, MtpslError, Preempted
from mtpsl.core.faults import ENV as FAULT_ENV
from mtpsl.engine.callbacks.preemption import STOP_SIGNALS

JOB_ID_ENV = "MTPSL_JOB_ID"
"""The scheduler's job id of this process, recorded in the run's environment block."""
CELL_FAULT_ENV = "MTPSL_CELL_FAULT"
"""Tests: ``CELL=FAULT;CELL=FAULT``: ``MTPSL_FAULT=FAULT`` (see :mod:`mtpsl.core.faults`) in
the process of that cell only, e.g. ``onelabel/sl/seed0=TERM@step#3``; for launches in
processes of their own (``--jobs N``, submitit)."""


def run_cell(out: Path, cell: Cell, config: Config, job: str | None) -> dict:
    """Train or continue ``cell`` of the grid in ``out``, recording what happens."""
    main = env_from_torchrun().is_main
    if main:
        record(out, cell.key, "started", job=job, **here(), **_devices())
    try:
        final = train_or_continue(config, cell.folder(out))
    except (Preempted, Interrupted, KeyboardInterrupt, SystemExit) as err:
        if main:
            record(out, cell.key, "stopped", job=job, reason=_reason(err))
        raise
    except BaseException as err:
        if main:
            record(out, cell.key, "failed", job=job, error=one_line(err))
        raise
    if main:
        record(out, cell.key, "done", job=job)
    return final


def _devices() -> dict[str, Any]:
    import torch

    return {"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads()}


def _reason(err: BaseException) -> str:
    if isinstance(err, SystemExit):  # submitit's handler, requeueing the job before the fit
        return "requeued"
    if isinstance(err, Preempted):
        text = str(err)
        for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
            if name in text:
                return name
        return "preempted"
    return "interrupted"


def one_line(err: BaseException, limit: int = 400) -> str:
    """An error on one line, as the CLI would print it (with the class for errors that are
    not mtpsl's own), for the cell's event log and ``--status``."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    if isinstance(err, MtpslError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def apply_cell_fault(key: str) -> None:
    """``MTPSL_CELL_FAULT``'s fault for this cell, if any, as this process's ``MTPSL_FAULT``."""
    for item in filter(None, os.environ.get(CELL_FAULT_ENV, "").split(";")):
        cell, _, fault = item.strip().partition("=")
        if cell == key:
            os.environ[FAULT_ENV] = fault


def cell_from_manifest(out: Path, key: str) -> tuple[Cell, Config, Config]:
    """The cell named ``key``, the grid's config and the cell's config, from the manifest."""
    manifest = read_manifest(out)
    found = [c for c in manifest["cells"] if c["key"] == key]
    if not found:
        raise MtpslError(f"{out} has no cell {key!r}; cells: "
                         f"{', '.join(c['key'] for c in manifest['cells'])}")
    cell = manifest_cells({"cells": found})[0]
    grid = build_config(manifest["config"], f"{out}/launch/grid.json")
    return cell, grid, cell_config_for(grid, cell.regime, cell.method, cell.seed, out)


def manifest_cells(manifest: dict) -> list[Cell]:
    return [Cell(c["regime"], c["method"], int(c["seed"])) for c in manifest["cells"]]


def finish_if_complete(out: Path) -> str | None:
    """Once every cell of the grid in ``out`` is done, its tables and figures (written by
    whichever process sees it first, the others wait and write the same); None before."""
    manifest = read_manifest(out)
    if not all(cell.done(out) for cell in manifest_cells(manifest)):
        return None
    with tables_lock(out):
        return write_results(build_config(manifest["config"], f"{out}/launch/grid.json"), out)


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class CellJob:
    """A submitit job training one cell; requeued (from its mid-epoch checkpoint) when the
    cluster stops it.

    submitit calls :meth:`checkpoint` on its requeue signal (USR2 unless
    ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) and requeues the job; mtpsl's own stop
    signals (SIGTERM, SIGUSR1) make the run write a mid-epoch checkpoint. While the cell
    trains, the requeue signal is handed to the run as SIGUSR1 so that it checkpoints first;
    once the run has stopped, submitit's handler is called to requeue. The last cell of the
    grid to end writes the tables. Only submitit is needed on the node, and only here."""

    def __init__(self, out: str, key: str, threads: int | None = None) -> None:
        self.out, self.key, self.threads = out, key, threads

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        job = str(env.job_id)
        os.environ[JOB_ID_ENV] = job
        if env.num_tasks > 1:  # one process per GPU, with what torchrun would export
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True)
        set_threads(self.threads)
        apply_cell_fault(self.key)
        requeue = _bridge_requeue_signal(getattr(signal, f"SIG{env.USR_SIG}"))
        out = Path(self.out)
        cell, _, config = cell_from_manifest(out, self.key)
        try:
            run_cell(out, cell, config, job)
        except Preempted as err:
            if env.global_rank != 0:
                return "stopped"  # rank 0 requeues the job (all its processes)
            print(f"mtpsl: {err}; requeueing job {job}", file=sys.stderr, flush=True)
            try:
                requeue()
            except Exception as err:  # the scheduler refused: say so in the cell's log
                record(out, cell.key, "failed", job=job,
                       error=f"stopped and could not be requeued: {one_line(err)}")
                raise
            raise
        if env.global_rank == 0:
            finish_if_complete(out)
        return "done"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same job again (the run folder holds the progress)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _bridge_requeue_signal(requeue_signal: int) -> Callable[[], None]:
    """Route submitit's requeue signal to the run's stop request while it trains; returns
    the call that makes submitit requeue the job (its own handler)."""
    submitit_handler = signal.getsignal(requeue_signal)

    def requeue() -> None:
        if not callable(submitit_handler):
            raise MtpslError("not inside a submitit job: nothing to requeue")
        submitit_handler(requeue_signal, None)

    stop = getattr(signal, "SIGUSR1", None)
    if stop is None or requeue_signal == stop:
        return requeue  # the run's Preemption callback owns this signal itself while training

    def bridge(signum: int, frame: object) -> None:
        if signal.getsignal(stop) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), stop)  # training: the run checkpoints, then requeue() runs
        else:
            requeue()  # before or after training: nothing to save first

    signal.signal(requeue_signal, bridge)
    return requeue


def _stop_outside_training(signum: int, frame: object) -> None:
    """A stop signal before the training starts (or after it ended): nothing to save, stop
    now as a preempted run does (exit 75, resumable), instead of dying of the signal."""
    raise Preempted(f"stopped by {signal.Signals(signum).name} outside the training loop; "
                    "the cell continues from its last checkpoint, if any")


def main(argv: list[str] | None = None) -> int:
    """A cell in a process of its own (the local launcher's ``--jobs N``); exit status as
    ``mtpsl``'s: 0, 2 (an error), 75 (stopped with a checkpoint), 130 (Ctrl-C)."""
    parser = argparse.ArgumentParser(prog="python -m mtpsl.analysis.launch")
    parser.add_argument("out")
    parser.add_argument("cell")
    parser.add_argument("--job", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cores", help="CPU cores the process was pinned to (by __main__)")
    args = parser.parse_args(argv)
    os.environ[JOB_ID_ENV] = args.job
    set_threads(args.threads)
    apply_cell_fault(args.cell)
    for sig in STOP_SIGNALS:  # outside the fit, whose own handler checkpoints first
        signal.signal(sig, _stop_outside_training)
    out = Path(args.out)
    try:
        cell, _, config = cell_from_manifest(out, args.cell)
        run_cell(out, cell, config, args.job)
    except MtpslError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except Exception:
        traceback.print_exc()
        return 1
    return 0


