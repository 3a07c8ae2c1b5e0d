"""The local launcher: a grid's cells on this machine.

``jobs: 1`` trains the cells one after another in the compare process itself (as ``compare``
always has: a SIGTERM stops the grid after the running cell's checkpoint, exit 75). ``jobs: N``
runs N cells at once, each in a process of its own (``python -m mtpsl.analysis.launch``, its
output in ``OUT/launch/logs/<cell>.log``) pinned to its own GPU(s) through
``CUDA_VISIBLE_DEVICES`` and to its share of the CPU: as many torch threads
(``OMP_NUM_THREADS``, ``torch.set_num_threads``) and, where they suffice, cores of its own.
A cell that another process stops (SIGTERM/SIGUSR1) is started again and continues from its
mid-epoch checkpoint; a cell that fails is reported with its log while the others go on. A
stop signal to compare reaches every running cell (each writes its checkpoint) and compare
exits 75 (130 for Ctrl-C); running compare again continues. A cell is one run folder, locked
by the one process that trains it.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mtpsl.analysis.grid import Cell, cell_config_for
from mtpsl.analysis.launch.cell import run_cell
from mtpsl.analysis.launch.state import events, here, launch_dir, record
from mtpsl.core.config import Config, LauncherConfig
from mtpsl.core.errors import ConfigError, Interrupted, MtpslError, Preempted

POLL_S = 0.2
_USR1 = getattr(signal, "SIGUSR1", None)
_STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, _USR1, signal.SIGINT) if s is not None)
MAX_RESTARTS = 10
"""Restarts of one stopped cell within one compare (a stop that keeps coming is not retried
for ever)."""


def run_local(config: Config, out: Path, cells: Sequence[Cell], todo: Sequence[Cell]) -> None:
    """Train the cells of ``todo`` (``cells`` is the whole grid, for the progress lines)."""
    launcher = config.compare.launcher
    if launcher.jobs == 1:
        run_in_process(config, out, cells, todo)
    else:
        run_in_processes(config, out, cells, todo, launcher)


def run_in_process(config: Config, out: Path, cells: Sequence[Cell], todo: Sequence[Cell]
                   ) -> None:
    """One cell after another in this process; an error stops the grid (re-running compare
    continues it)."""
    job = f"local-{os.getpid()}"
    trained: list[float] = []
    for k, cell in enumerate(cells, 1):
        if cell not in todo:
            continue
        left = len(todo) - len(trained)
        eta = f", ETA {sum(trained) / len(trained) * left / 60:.1f} min" if trained else ""
        print(f"== run {k} of {len(cells)}: {cell.regime} / {cell.method} / seed {cell.seed} "
              f"-> {cell.folder(out)}{eta}", file=sys.stderr, flush=True)
        record(out, cell.key, "submitted", job=job, launcher="local", **here())
        began = time.perf_counter()
        run_cell(out, cell, cell_config_for(config, cell.regime, cell.method, cell.seed, out),
                 job)
        trained.append(time.perf_counter() - began)


@dataclass(frozen=True)
class Slot:
    """Where one of the N concurrent cells runs."""

    env: dict[str, str]
    threads: int
    """torch threads of each of the cell's processes."""
    processes: int
    """Processes of the cell: its GPUs (one data-parallel process each) or 1."""
    label: str
    cores: tuple[int, ...] = ()
    """CPU cores of its own (none: the cells share the machine's)."""


def cpu_cores() -> list[int]:
    """The cores this process may use."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def visible_gpus(device: str) -> list[str]:
    """The GPUs cells may be pinned to ([] when cells train on the CPU)."""
    if device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan_slots(launcher: LauncherConfig, gpus: Sequence[str], cores: Sequence[int],
               device: str = "auto") -> list[Slot]:
    """``jobs`` slots: each its own ``gpus_per_cell`` GPUs when there are GPUs, and its
    share of the CPU (``cpus_per_cell`` threads, else the cores over jobs; cores of its own
    where there are enough for every slot)."""
    jobs = launcher.jobs
    per_cell = launcher.cpus_per_cell or max(1, len(cores) // jobs)

    def own(i: int) -> tuple[int, ...]:
        return tuple(cores[i * per_cell:(i + 1) * per_cell]) if jobs * per_cell <= len(cores) \
            else ()

    threads = f"{per_cell} CPU thread{'s' * (per_cell > 1)}"
    if not gpus:
        return [Slot({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}, per_cell, 1,
                     threads, own(i)) for i in range(jobs)]
    if ":" in device:
        raise ConfigError(f"train.device: {device} names one GPU, but compare.launcher.jobs="
                          f"{jobs} gives each cell GPUs of its own; use cuda or auto")
    width = max(1, launcher.gpus_per_cell)
    if jobs * width > len(gpus):
        raise ConfigError(
            f"compare.launcher.jobs: {jobs} cells at once with {width} GPU(s) each need "
            f"{jobs * width} GPUs; this machine shows {len(gpus)} ({','.join(gpus)}); "
            "allowed: jobs x gpus_per_cell <= the GPUs")
    slots = []
    for i in range(jobs):
        mine = ",".join(gpus[i * width:(i + 1) * width])
        slots.append(Slot({"CUDA_VISIBLE_DEVICES": mine}, max(1, per_cell // width), width,
                          f"GPU {mine}, {threads}", own(i)))
    return slots


def cell_command(out: Path, cell: Cell, job: str, slot: Slot) -> list[str]:
    """The command of one cell's process; over several GPUs, under torchrun."""
    entry = ["-m", "mtpsl.analysis.launch", str(out), cell.key, "--job", job,
             "--threads", str(slot.threads)]
    if slot.cores:
        entry += ["--cores", ",".join(map(str, slot.cores))]
    if slot.processes == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={slot.processes}", *entry]


@dataclass
class _Running:
    cell: Cell
    job: str
    slot: Slot
    process: subprocess.Popen
    log: IO[Any]
    began: float = field(default_factory=time.perf_counter)


def run_in_processes(config: Config, out: Path, cells: Sequence[Cell], todo: Sequence[Cell],
                     launcher: LauncherConfig) -> None:
    """``launcher.jobs`` cells at once, each in a process of its own."""
    slots = plan_slots(launcher, visible_gpus(config.train.device), cpu_cores(),
                       config.train.device)
    queue, free = list(todo), list(slots)
    running: list[_Running] = []
    restarts: dict[Cell, int] = {}
    failed: list[str] = []
    stopped: list[str] = []
    stop: list[int] = []
    ids = itertools.count(1)

    def on_signal(signum: int, frame: object) -> None:
        if not stop:
            print(f"== {signal.Signals(signum).name}: stopping the running cells (each "
                  "writes its checkpoint)", file=sys.stderr, flush=True)
        stop.append(signum)
        for r in running:  # SIGTERM for Ctrl-C too: a clean mid-epoch checkpoint
            _signal(r.process, signal.SIGUSR1 if signum == _USR1 else signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
    n_done = sum(c.done(out) for c in cells)
    try:
        while running or (queue and not stop):
            while queue and free and not stop:
                cell, slot = queue.pop(0), free.pop(0)
                running.append(_start(out, cell, f"local-{os.getpid()}-{next(ids)}", slot))
                r = running[-1]
                print(f"== cell {cells.index(cell) + 1} of {len(cells)}: {cell.key} started "
                      f"(job {r.job}, {slot.label}); log {r.log.name}", file=sys.stderr,
                      flush=True)
            time.sleep(POLL_S)
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                free.append(r.slot)
                r.log.close()
                outcome = _outcome(out, r)
                seconds = time.perf_counter() - r.began
                if r.cell.done(out):
                    n_done += 1
                    print(f"== cell {r.cell.key} done in {seconds:.0f} s ({n_done} of "
                          f"{len(cells)} done)", file=sys.stderr, flush=True)
                elif outcome.startswith("stopped") and not stop and \
                        restarts.get(r.cell, 0) < MAX_RESTARTS:
                    restarts[r.cell] = restarts.get(r.cell, 0) + 1
                    queue.insert(0, r.cell)
                    print(f"== cell {r.cell.key} {outcome}: requeued, it continues from its "
                          "checkpoint", file=sys.stderr, flush=True)
                elif stop or outcome.startswith("stopped"):  # compare itself is stopping
                    stopped.append(r.cell.key)
                else:
                    failed.append(f"{r.cell.key} ({outcome}; log: {r.log.name})")
                    print(f"== cell {r.cell.key} failed: {outcome}; log {r.log.name}",
                          file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        what = (f"stopped {len(stopped)} running cell(s) with a checkpoint; "
                "run the same compare again to continue")
        if stop[0] == signal.SIGINT:
            raise Interrupted(f"compare interrupted: {what}")
        raise Preempted(f"compare stopped by {signal.Signals(stop[0]).name}: {what}")
    if failed:
        raise MtpslError(f"{len(failed)} cell(s) failed: {'; '.join(failed)}; the other cells "
                         "are done; run the same compare again to retrain only the failed ones")


def _start(out: Path, cell: Cell, job: str, slot: Slot) -> _Running:
    path = launch_dir(out) / "logs" / f"{cell.key}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a")  # closed when the process ends
    log.write(f"== job {job} ({slot.label}) at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log.flush()
    env = {**os.environ, **slot.env, "OMP_NUM_THREADS": str(slot.threads),
           "MKL_NUM_THREADS": str(slot.threads)}
    # a session of its own: a Ctrl-C in the terminal reaches compare, which stops each cell
    # cleanly, instead of every process at once
    process = subprocess.Popen(cell_command(out, cell, job, slot), env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    record(out, cell.key, "submitted", job=job, launcher="local", host=here()["host"],
           pid=process.pid, log=str(path), slot=slot.label)
    return _Running(cell, job, slot, process, log)


def _signal(process: subprocess.Popen, sig: int) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass


def _outcome(out: Path, r: _Running) -> str:
    """What the cell's process said before it ended (its events), else its exit status."""
    mine = [e for e in events(out, r.cell.key)
            if e.get("job") == r.job and e["event"] != "submitted"]
    last = mine[-1] if mine else None
    if last is not None and last["event"] == "stopped":
        return f"stopped ({last.get('reason', '?')})"
    if last is not None and last["event"] == "failed":
        return str(last.get("error", "failed"))
    code = r.process.returncode
    what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    return f"ended without a result ({what})"
