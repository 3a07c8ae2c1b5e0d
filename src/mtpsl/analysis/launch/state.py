"""What a grid folder records about its cells' jobs, and each cell's state from it.

``OUT/launch/grid.json`` (the manifest) holds the grid's config and cells, written by
``compare`` before it launches anything; ``OUT/launch/cells/<cell>.jsonl`` is each cell's
event log, one JSON object a line, appended by whoever has news:

- ``submitted`` (by the launcher): job id, launcher, and where the job's log and process are;
- ``started``, ``stopped`` (preempted or interrupted, a checkpoint written), ``failed`` (with
  the error) and ``done`` (by the process training the cell, rank 0), each with the job id.

A log per cell (rather than one state file) because the launcher and the job write without
waiting for each other: a job may start before its launcher has recorded submitting it. The
state is read from the newest submission's events, the run folder (``final_metrics.json``
means done, whoever wrote it) and whether the job is still alive: a process of this machine
is asked directly, a SLURM job through submitit (``sacct``). No torch here: ``compare
--status`` answers at once.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtpsl.core.errors import DataError, RunFolderError
from mtpsl.core.files import write_text
from mtpsl.core.rundir import RunLock, fcntl

LAUNCH_DIR = "launch"
MANIFEST = "grid.json"
STATES = ("pending", "running", "done", "failed")

STOPPED_SLURM_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT"})
"""SLURM job states after which the job will not run again (``REQUEUED`` is not one)."""


def launch_dir(out: Path) -> Path:
    return Path(out) / LAUNCH_DIR


def events_path(out: Path, key: str) -> Path:
    return launch_dir(out) / "cells" / f"{key}.jsonl"


def write_manifest(out: Path, config: Mapping[str, Any], cells: Sequence[Mapping[str, Any]]
                   ) -> Path:
    """The grid's config (a ``model_dump``) and cells (``key``, ``regime``, ``method``,
    ``seed``), for ``--status`` and for the job that writes the tables when the last cell
    ends, and the compare process that wrote it."""
    path = launch_dir(out) / MANIFEST
    write_text(path, json.dumps({"config": config, "cells": list(cells), "compare": here()},
                                indent=1, default=str) + "\n")
    return path


def read_manifest(out: Path) -> dict:
    path = launch_dir(out) / MANIFEST
    if not path.is_file():
        raise DataError(f"{out} is not a compare grid of this mtpsl ({path} is missing); "
                        f"`mtpsl report {out}` tables whatever runs it holds")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def record(out: Path, key: str, event: str, **fields: Any) -> None:
    """Append one event to a cell's log (one short line: appends of it do not interleave)."""
    path = events_path(out, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str)
    with open(path, "a") as f:
        f.write(line + "\n")


def events(out: Path, key: str) -> list[dict]:
    """A cell's events, oldest first; a torn last line (a writer killed mid-line) is skipped."""
    path = events_path(out, key)
    if not path.is_file():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def launch_lock(out: Path) -> RunLock:
    """Held by the ``compare`` process launching (or, locally, running) the grid: a second
    compare of the same folder at the same time is refused instead of starting cells twice."""
    folder = launch_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return RunLock(folder).acquire()
    except RunFolderError:
        holder = (folder / ".lock").read_text().strip() or "?"
        raise RunFolderError(f"grid {out} is being launched or run by another mtpsl compare "
                             f"(pid {holder}); see `mtpsl compare --status {out}`") from None


@contextmanager
def tables_lock(out: Path) -> Iterator[None]:
    """One writer of a grid's tables at a time (two cells may end together); waits."""
    path = launch_dir(out) / ".tables.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def here() -> dict[str, Any]:
    """Host and process id: where a job can be asked whether it is still alive."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@dataclass
class CellStatus:
    key: str
    state: str
    """pending (not launched, queued, or waiting to be requeued), running, done or failed."""
    job: str | None
    host: str | None
    starts: int
    """Times the newest job started the cell (more than once: requeued)."""
    epochs: str
    detail: str
    active: bool
    """A live job will (still) train the cell: launching it again would only collide."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine is alive (a zombie, ended but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def job_alive(submitted: Mapping[str, Any]) -> bool:
    """Whether the job of a ``submitted`` event may still run the cell. A process recorded
    on this host is asked directly; a SLURM job through submitit; anything else (another
    machine, no scheduler answer) is taken to be alive, so it is never launched twice."""
    pid, host = submitted.get("pid"), submitted.get("host")
    if pid is not None and host == socket.gethostname():
        return pid_alive(int(pid))
    if submitted.get("cluster") == "slurm":
        state = slurm_state(str(submitted.get("job")), submitted.get("folder"))
        return state is None or state.split()[0] not in STOPPED_SLURM_STATES
    return True


def slurm_state(job: str, folder: str | None) -> str | None:
    """A SLURM job's state from ``sacct`` (via submitit), None when it cannot be asked."""
    try:
        import submitit

        return str(submitit.SlurmJob(folder or ".", job).state)
    except Exception:  # no submitit, no sacct, an unknown job: no answer
        return None


def epochs_logged(folder: Path) -> int:
    try:
        with open(folder / "metrics.jsonl") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def cell_status(out: Path, key: str, total_epochs: int,
                alive: Callable[[Mapping[str, Any]], bool] = job_alive) -> CellStatus:
    """A cell's state from its run folder and the events of its newest job."""
    folder = Path(out) / key
    log = events(out, key)
    submissions = [e for e in log if e["event"] == "submitted"]
    sub = submissions[-1] if submissions else None
    job = sub.get("job") if sub else None
    mine = [e for e in log if sub is not None and e.get("job") == job
            and e["event"] != "submitted"]
    starts = [e for e in mine if e["event"] == "started"]
    stops = [e for e in mine if e["event"] == "stopped"]
    last = mine[-1] if mine else None
    host = starts[-1].get("host") if starts else None
    logged = epochs_logged(folder)
    epochs = f"{logged}/{total_epochs}"
    where = f"; log: {sub['log']}" if sub and sub.get("log") else ""
    requeued = f"stopped {len(stops)}x ({stops[-1].get('reason', '?')}), requeued; " \
        if stops else ""

    def status(state: str, detail: str, active: bool = False) -> CellStatus:
        return CellStatus(key, state, job, host, len(starts), epochs, detail, active)

    if (folder / "final_metrics.json").exists():
        return status("done", requeued.removesuffix("; "))
    if sub is None:
        begun = f"stopped at epoch {logged}" if (folder / "config.yaml").exists() else ""
        return status("pending", begun or "not launched yet")
    if last is not None and last["event"] == "failed":
        return status("failed", f"{last.get('error', '?')}{where}")
    live = alive(sub)
    if last is None:
        if live:
            return status("pending", "queued", True)
        return status("failed", f"job {job} ended before the cell started{where}")
    if last["event"] == "started":
        if live:
            return status("running", requeued.removesuffix("; "), True)
        return status("failed", f"ended without a result (killed? out of memory?){where}")
    if last["event"] == "stopped":
        if live:
            return status("pending", f"{requeued}waiting to restart", True)
        return status("pending", f"stopped ({last.get('reason', '?')}) at epoch {logged}; "
                      "compare continues it")
    return status("failed", f"reported {last['event']} but has no final_metrics.json{where}")


def grid_status(out: Path, alive: Callable[[Mapping[str, Any]], bool] = job_alive
                ) -> list[CellStatus]:
    manifest = read_manifest(out)
    total = int(manifest["config"]["train"]["epochs"])
    return [cell_status(out, c["key"], total, alive) for c in manifest["cells"]]


def status_table(statuses: Sequence[CellStatus]) -> str:
    """One line per cell, aligned columns."""
    rows = [("cell", "state", "job", "host", "starts", "epochs", "detail")]
    rows += [(s.key, s.state, s.job or "-", s.host or "-", str(s.starts), s.epochs, s.detail)
             for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def summary_line(statuses: Sequence[CellStatus]) -> str:
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    return ", ".join(f"{n} {state}" for state, n in counts.items())


def status_text(out: Path) -> str:
    """What ``mtpsl compare --status OUT`` prints."""
    out = Path(out)
    manifest = read_manifest(out)
    statuses = grid_status(out)
    launcher = manifest["config"]["compare"]["launcher"]
    if launcher["name"] == "submitit":
        clusters = {str(e["cluster"]) for c in manifest["cells"] for e in events(out, c["key"])
                    if e["event"] == "submitted" and e.get("cluster")}
        how = f"submitit ({', '.join(sorted(clusters)) or launcher['cluster']})"
    else:
        how = f"local (--jobs {launcher['jobs']})"
    lines = [f"grid {out}: {len(statuses)} cells, launcher {how}: {summary_line(statuses)}",
             "", status_table(statuses), ""]
    results = out / "results.md"
    if results.exists():
        lines.append(f"tables: {results} (and results.csv, curves.png, seeds.png)")
    else:
        lines.append(f"tables: not yet ({results} is written when the last cell ends)")
    launcher_process = manifest.get("compare") or {}
    pid = int(launcher_process.get("pid") or 0)
    if pid > 0 and pid != os.getpid() and pid_alive(pid) \
            and launcher_process.get("host") == socket.gethostname():
        lines.append(f"compare (pid {pid}) is at work on this grid")
    elif any(s.state == "failed" or (s.state == "pending" and not s.active) for s in statuses):
        lines.append("re-run the same `mtpsl compare` command to launch the failed and "
                     "pending cells (only those)")
    return "\n".join(lines)
