"""The submitit launcher: one cluster job per cell (one job array per ``compare``), through
submitit's executors: SLURM, or its local executor (the same jobs as processes of this
machine, to try a set-up before queueing it).

Each job is a :class:`~mtpsl.analysis.launch.cell.CellJob` with the partition, time limit,
GPUs, CPUs and memory of ``compare.launcher``; a cell with several GPUs is one process per GPU
(submitit's tasks, each with the environment torchrun would give it). Jobs record their
progress in the grid folder (see :mod:`mtpsl.analysis.launch.state`); the one that ends the
grid writes the tables, so ``compare`` need not wait (``--wait`` does).
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtpsl.analysis.grid import Cell
from mtpsl.analysis.launch.cell import CellJob
from mtpsl.analysis.launch.state import CellStatus, grid_status, launch_dir, record, summary_line
from mtpsl.core.config import LauncherConfig
from mtpsl.core.errors import ConfigError


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("compare.launcher.name: submitit needs the submitit package: pip "
                          "install 'mtpsl[cluster]' (or pip install submitit); allowed "
                          "without it: local") from None
    return submitit


def cluster_of(launcher: LauncherConfig) -> str:
    """slurm or local: ``auto`` is slurm where ``sbatch`` is on the PATH."""
    if launcher.cluster != "auto":
        return launcher.cluster
    return "slurm" if shutil.which("sbatch") else "local"


def executor_parameters(launcher: LauncherConfig, name: str) -> dict[str, Any]:
    """submitit's AutoExecutor parameters of one cell's job."""
    gpus = launcher.gpus_per_cell
    tasks = gpus if gpus > 1 else 1
    params: dict[str, Any] = {
        "name": name, "timeout_min": launcher.time_min, "nodes": 1, "tasks_per_node": tasks,
        "gpus_per_node": gpus,
        "cpus_per_task": max(1, launcher.cpus_per_cell // tasks) if launcher.cpus_per_cell
        else None,
        "mem_gb": launcher.mem_gb,
        "slurm_partition": launcher.partition,
        "slurm_array_parallelism": launcher.array_parallelism,
        "slurm_setup": list(launcher.setup) or None,
        "slurm_additional_parameters": dict(launcher.slurm) or None,
        "local_setup": list(launcher.setup) or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def submit(launcher: LauncherConfig, out: Path, cells: Sequence[Cell], name: str) -> list[Any]:
    """Submit one job per cell (a job array on SLURM); record each submission."""
    submitit = import_submitit()
    cluster = cluster_of(launcher)
    folder = launch_dir(out).resolve() / "submitit"
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                     slurm_max_num_timeout=launcher.max_timeouts,
                                     local_max_num_timeout=launcher.max_timeouts)
    executor.update_parameters(**executor_parameters(launcher, name))
    tasks = executor_parameters(launcher, name)["tasks_per_node"]
    threads = max(1, launcher.cpus_per_cell // tasks) if launcher.cpus_per_cell else None
    jobs = executor.submit_array([CellJob(str(Path(out).resolve()), c.key, threads)
                                  for c in cells])
    for cell, job in zip(cells, jobs, strict=True):
        where: dict[str, Any] = {}
        if cluster == "local":  # the job id is the pid of the local executor's controller
            where = {"host": socket.gethostname(), "pid": int(job.job_id)}
        record(out, cell.key, "submitted", job=str(job.job_id), launcher="submitit",
               cluster=cluster, folder=str(folder), log=str(job.paths.stderr), **where)
    return list(jobs)


def wait(out: Path, jobs: Sequence[Any], poll_s: float) -> list[CellStatus]:
    """Until no cell of the grid has a live job; prints each change of the counts."""
    shown = None
    while True:
        for job in jobs:  # lets submitit reap the local executor's ended processes
            job.done()
        statuses = grid_status(out)
        line = summary_line(statuses)
        if line != shown:
            print(f"== {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)
            shown = line
        if not any(s.active for s in statuses):
            return statuses
        time.sleep(poll_s)
