"""Grids of runs (methods x label regimes x seeds) and the tables that summarise them.

Each cell is an ordinary run in ``OUT/<regime>/<method>/seed<k>``; a cell whose
``final_metrics.json`` exists is not trained again, so an interrupted grid resumes. Tables
report the mean +- std over seeds of each task's primary metric and the multi-task gain
Delta_m against the baseline method (STL) under the same regime.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .config import Config
from .errors import ConfigError
from .evaluate import higher_is_better, primary_keys
from .experiment import open_dataset
from .metrics import delta_m
from .tasks import Task
from .train import train

ARROWS = {True: "↑", False: "↓"}


def run_grid(config: Config, out: Path) -> list[dict]:
    """Train every (regime, method, seed) cell; return their final metrics."""
    grid = config.compare
    results = []
    for regime in grid.regimes:
        for method in grid.methods:
            for seed in grid.seeds:
                cell = out / regime / method / f"seed{seed}"
                final_path = cell / "final_metrics.json"
                if not final_path.exists():
                    cell_config = _cell_config(config, regime, method, seed)
                    print(f"== {regime} / {method} / seed {seed} -> {cell}", flush=True)
                    train(cell_config, cell)
                result = json.loads(final_path.read_text())
                results.append({**result, "regime": regime, "method": method, "seed": seed})
    return results


def _cell_config(config: Config, regime: str, method: str, seed: int) -> Config:
    data = config.model_dump()
    data["name"] = f"{regime}-{method}-seed{seed}"
    data["seed"] = seed
    data["labels"]["regime"] = regime
    data["method"]["name"] = method
    return Config.model_validate(data)


def summarise(
    results: Sequence[Mapping], tasks: Mapping[str, Task], baseline: str
) -> list[dict]:
    """One row per (regime, method): mean/std per primary metric and Delta_m vs baseline."""
    keys = primary_keys(tasks)
    better = higher_is_better(tasks)
    rows = []
    for regime in dict.fromkeys(r["regime"] for r in results):
        in_regime = [r for r in results if r["regime"] == regime]
        base_runs = [r for r in in_regime if r["method"] == baseline]
        base = {k: float(np.mean([r["metrics"][k] for r in base_runs])) for k in keys}
        for method in dict.fromkeys(r["method"] for r in in_regime):
            runs = [r for r in in_regime if r["method"] == method]
            row: dict = {"regime": regime, "method": method, "seeds": len(runs)}
            for k in keys:
                values = [r["metrics"][k] for r in runs]
                row[k] = float(np.mean(values))
                row[f"{k}:std"] = float(np.std(values))
            if base_runs:
                gains = [delta_m({k: r["metrics"][k] for k in keys}, base, better) for r in runs]
                row["delta_m"] = float(np.mean(gains))
                row["delta_m:std"] = float(np.std(gains))
            rows.append(row)
    return rows


def markdown_table(rows: Sequence[Mapping], tasks: Mapping[str, Task], baseline: str) -> str:
    keys = primary_keys(tasks)
    better = higher_is_better(tasks)
    header = ["regime", "method", "seeds"] + [f"{k} {ARROWS[better[k]]}" for k in keys]
    header.append(f"Δm % vs {baseline} ↑")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["regime"], row["method"], str(row["seeds"])]
        cells += [_pm(row[k], row[f"{k}:std"], row["seeds"]) for k in keys]
        cells.append(_pm(row["delta_m"], row["delta_m:std"], row["seeds"]) if "delta_m" in row
                     else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def write_tables(rows: Sequence[Mapping], table: str, out: Path) -> None:
    (out / "results.md").write_text(table + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def compare(config: Config, out: Path) -> str:
    """Run the grid of ``config.compare`` into ``out`` and write results.md / results.csv."""
    grid = config.compare
    if grid.baseline not in grid.methods:
        print(f"note: baseline {grid.baseline!r} is not in the grid; Delta_m is left out")
    if not grid.methods or not grid.regimes or not grid.seeds:
        raise ConfigError("compare: methods, regimes and seeds must each be non-empty")
    out.mkdir(parents=True, exist_ok=True)
    results = run_grid(config, out)
    tasks = open_dataset(config, config.dataset.eval_split).tasks
    rows = summarise(results, tasks, grid.baseline)
    table = markdown_table(rows, tasks, grid.baseline)
    write_tables(rows, table, out)
    return table
