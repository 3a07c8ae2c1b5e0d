"""Grids of runs (methods x label regimes x seeds) and the tables that summarise them.

Each cell is an ordinary run in ``OUT/<regime>/<method>/seed<k>`` (see
:mod:`mtpsl.analysis.grid`); a cell whose ``final_metrics.json`` exists is not trained again,
so an interrupted grid resumes. ``compare.launcher`` says where the cells train (see
:mod:`mtpsl.analysis.launch`): in this process one after another, N at once on this machine,
or as cluster jobs through submitit; ``compare --status OUT`` lists the cells' states. Tables
(built by :mod:`mtpsl.analysis.report`, the one implementation of the tables) are written
when the last cell ends, the same however the cells were run: one row per set-up, with the
mean and 95% interval over seeds of each task's primary metric (or of
``compare.delta_metrics``), and the paired multi-task gain Delta_m against the baseline method
(STL) of the same set-up, with its verdict; cross-dataset grids get one more table per source,
from the runs' ``metrics@<source>``. ``curves.png/.pdf`` plots each task's primary metric over
epochs, one line per method (mean over seeds); ``seeds.png/.pdf`` every seed's value.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mtpsl.analysis import report
from mtpsl.analysis.grid import (
    Cell,
    all_cells,
    cell_config_for,
    check_cells,
    check_delta_metrics,
    check_folders,
    check_teachers,
    grid_cells,
    sweep_weightings,
    train_or_continue,
    write_curves,
    write_tables,
)
from mtpsl.analysis.launch.cell import finish_if_complete
from mtpsl.analysis.launch.cluster import cluster_of, submit, wait
from mtpsl.analysis.launch.local import run_local
from mtpsl.analysis.launch.state import grid_status, launch_lock, status_text, write_manifest
from mtpsl.core.config import Config
from mtpsl.core.errors import ConfigError, MtpslError

ARROWS = report.ARROWS
__all__ = ["ARROWS", "Cell", "all_cells", "cell_config_for", "check_cells", "compare",
           "grid_cells", "status_text", "sweep_weightings", "train_or_continue",
           "write_curves", "write_tables"]

POLL_S = {"local": 1.0, "slurm": 30.0}
"""How often ``compare --wait`` looks at the cells of each submitit cluster."""


def check_grid(config: Config, out: Path) -> None:
    """Everything that can be checked before a cell trains."""
    grid = config.compare
    if grid.baseline not in grid.methods:
        print(f"note: baseline {grid.baseline!r} is not in the grid; Delta_m is left out",
              file=sys.stderr)
    if not grid.methods or not grid.regimes or not grid.seeds:
        raise ConfigError("compare: methods, regimes and seeds must each be non-empty")
    if grid.launcher.name == "submitit" and grid.launcher.jobs != 1:
        raise ConfigError(f"compare.launcher.jobs: {grid.launcher.jobs} is for the local "
                          "launcher; submitit runs each cell as a job of its own (allowed: 1)")
    check_delta_metrics(config)
    check_teachers(config)
    check_cells(config)
    check_folders(config, out)


def compare(config: Config, out: str | Path, wait_for_jobs: bool = False) -> str:
    """Train (or submit) the cells of ``config.compare`` missing in ``out``; returns the
    tables (results.md) once every cell is done, else what was submitted."""
    out = Path(out)
    check_grid(config, out)
    out.mkdir(parents=True, exist_ok=True)
    cells = all_cells(config)
    launcher = config.compare.launcher
    with launch_lock(out):
        write_manifest(out, config.model_dump(mode="json"),
                       [{"key": c.key, "regime": c.regime, "method": c.method, "seed": c.seed}
                        for c in cells])
        statuses = {s.key: s for s in grid_status(out)}
        todo = [c for c in cells if statuses[c.key].state != "done"
                and not statuses[c.key].active]
        if launcher.name == "local":
            run_local(config, out, cells, todo)
            return _tables(out)
        jobs = submit(launcher, out, todo, f"mtpsl-{config.name}") if todo else []
    cluster = cluster_of(launcher)
    if jobs:
        ids = [str(j.job_id) for j in jobs]
        print(f"submitted {len(jobs)} cell(s) to {cluster} (job{'s' * (len(ids) > 1)} "
              f"{_span(ids)}); logs in {out / 'launch' / 'submitit'}", file=sys.stderr,
              flush=True)
    if wait_for_jobs:
        statuses = {s.key: s for s in wait(out, jobs, POLL_S[cluster])}
    else:
        statuses = {s.key: s for s in grid_status(out)}
    failed = [s for s in statuses.values() if s.state == "failed"]
    if all(s.state == "done" for s in statuses.values()):
        return _tables(out)
    if failed:
        raise MtpslError(f"{len(failed)} cell(s) failed: "
                         + "; ".join(f"{s.key} ({s.detail})" for s in failed)
                         + "; run the same compare again to resubmit only those")
    return (f"{len(jobs)} cell(s) submitted, "
            f"{sum(s.state == 'done' for s in statuses.values())} of {len(cells)} done; "
            f"follow them with `mtpsl compare --status {out}`; the tables are written to "
            f"{out / 'results.md'} when the last cell ends")


def _tables(out: Path) -> str:
    text = finish_if_complete(out)
    if text is None:
        waiting = [s.key for s in grid_status(out) if s.state != "done"]
        return (f"{len(waiting)} cell(s) are still queued or running from an earlier launch "
                f"({', '.join(waiting)}); the tables are written to {out / 'results.md'} "
                f"when the last of them ends (see `mtpsl compare --status {out}`)")
    print(f"wrote {out / 'results.md'}, results.csv, curves.png/.pdf and seeds.png/.pdf",
          file=sys.stderr, flush=True)
    return text


def _span(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else f"{ids[0]} … {ids[-1]}"
