"""Result tables over finished runs: ``mtpsl report`` and the tables of ``mtpsl compare``.

Runs are grouped (by dataset and label regime, then method); each row holds the mean and std
over the group's seeds of every metric, and the multi-task gain Delta_m of each run against
the *mean* of the baseline method's runs in the same group, averaged over the seeds. The std
is the population std over seeds (``numpy.std``, ddof=0), 0 for a single seed.

Cross-dataset runs (``final_metrics.json`` holding ``metrics@<source>``) get one more table
per source, built the same way from that source's metrics: Delta_m per source is measured
against the baseline's runs evaluated on the same source.

The metrics of Delta_m (and the tables' columns) are each task's primary metric
(``Task.primary_metric``, recognised from the metric keys alone, see
:func:`infer_primary_keys`), unless ``compare.delta_metrics`` (or ``--delta-metrics``) names
them, e.g. ``[semantic/miou, depth/rmse]`` for SemiMTL. :func:`table_metrics` is the one place
that decides, for compare and report alike.

This module holds the one implementation of the tables: :func:`build_tables` (over
:func:`summarise`) builds the rows, :func:`tables_markdown`, :func:`tables_latex` and
:func:`write_csv` render them. :mod:`mtpsl.compare` calls them with the regime as the only
group column.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .errors import ConfigError, DataError, MtpslError
from .metrics import METRICS, delta_m
from .tasks import TASKS

ARROWS = {True: "↑", False: "↓"}
TEX_ARROWS = {True: r"$\uparrow$", False: r"$\downarrow$"}
FINAL = "final_metrics.json"
REPORT_GROUP = ("dataset", "regime")
"""Group columns of ``mtpsl report`` (compare uses ``("regime",)``)."""
SOURCE = "metrics@"
"""Prefix of a cross-dataset run's per-source metrics in ``final_metrics.json``."""
DELTA_KEY = "compare.delta_metrics / --delta-metrics"


# -- metric keys -----------------------------------------------------------------------------

def metric_directions(keys: Iterable[str]) -> dict[str, bool]:
    """``higher_is_better`` of flat ``task/metric`` keys, from the registered metric classes.

    Lets a table be built from metric files alone (the dataset need not be present).
    Raises MtpslError for a metric name no registered metric defines, or defines both ways.
    """
    known: dict[str, set[bool]] = {}
    for name in METRICS.names():
        for short, better in METRICS.get(name).higher_is_better.items():
            known.setdefault(short, set()).add(better)
    out = {}
    for key in keys:
        short = key.rsplit("/", 1)[-1]
        if len(known.get(short, ())) != 1:
            raise MtpslError(f"metric {key!r}: unknown direction (not a registered metric)")
        out[key] = next(iter(known[short]))
    return out


def infer_primary_keys(keys: Iterable[str]) -> list[str]:
    """The primary ``task/metric`` key of every task among ``keys``, in order of appearance.

    A task's metric keys identify its metric class (e.g. ``miou, pixel_acc, ...`` belong to the
    segmentation metric); the registered task type using that metric names the primary one,
    which must be among the keys.
    """
    by_task: dict[str, set[str]] = {}
    for key in keys:
        task, _, short = key.rpartition("/")
        if task:
            by_task.setdefault(task, set()).add(short)
    primaries: dict[str, str] = {}
    for kind in TASKS.names():
        task_cls = TASKS.get(kind)
        primaries.setdefault(task_cls.metric, task_cls.primary_metric)
    out = []
    for task, shorts in by_task.items():
        matches = {primaries[m] for m in primaries if m in METRICS.names()
                   and shorts <= set(METRICS.get(m).higher_is_better) and primaries[m] in shorts}
        if len(matches) != 1:
            raise MtpslError(
                f"task {task!r}: cannot tell its primary metric from keys {sorted(shorts)}"
            )
        out.append(f"{task}/{matches.pop()}")
    return out


def table_metrics(
    keys: Iterable[str], chosen: Sequence[str] | None = None
) -> tuple[list[str], dict[str, bool]]:
    """The Delta_m keys of one table and their directions, from the table's metric keys.

    ``chosen`` (``compare.delta_metrics``) wins where given, restricted to the keys present
    (a source may lack a task); otherwise each task's primary metric. Metric keys are all it
    needs, so compare and report decide the same way without opening the dataset.
    """
    keys = list(dict.fromkeys(keys))
    primary = infer_primary_keys(keys) if chosen is None else [k for k in chosen if k in keys]
    return primary, metric_directions(primary)


# -- loading runs ----------------------------------------------------------------------------

def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders: each path that holds ``final_metrics.json``, else every folder below it
    that does (a compare grid). Sorted within each argument; duplicates dropped."""
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise DataError(f"{path} is not a folder")
        found = [path] if (path / FINAL).is_file() else \
            sorted(p.parent for p in path.rglob(FINAL))
        runs += [r for r in found if r not in runs]
    if not runs:
        raise DataError(f"no runs ({FINAL}) found in {', '.join(str(p) for p in paths)}")
    return runs


def load_result(run_dir: str | Path) -> dict:
    """A run's final metrics plus ``dataset``/``root`` (from config.yaml) and ``run_dir``."""
    run_dir = Path(run_dir)
    try:
        final = json.loads((run_dir / FINAL).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{run_dir / FINAL}: cannot be read ({err})") from None
    missing = [k for k in ("method", "regime", "metrics") if k not in final]
    if missing:
        raise DataError(f"{run_dir / FINAL}: lacks {', '.join(missing)}")
    config_path = run_dir / "config.yaml"
    config: dict = {}
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise DataError(f"{config_path}: not valid YAML ({err})") from None
    dataset = config.get("dataset") or {}
    name, root = str(dataset.get("name", "?")), str(dataset.get("root", "?"))
    chosen = (config.get("compare") or {}).get("delta_metrics")
    # Tables name a run by its label (a compare variant, e.g. pcgrad) rather than the
    # method it runs (sl), so variants of one method stay separate rows.
    final = {**final, "method": final.get("label") or final["method"]}
    return {**final, "dataset": f"{name}:{root}", "dataset_name": name, "root": root,
            "delta_metrics": None if chosen is None else tuple(chosen),
            "run_dir": str(run_dir)}


# -- rows ------------------------------------------------------------------------------------

def summarise(
    results: Sequence[Mapping],
    primary: Sequence[str],
    better: Mapping[str, bool],
    baseline: str,
    group: Sequence[str] = ("regime",),
) -> list[dict]:
    """One row per (group..., method), in order of first appearance.

    Each row: the group values, ``method``, ``seeds``, then ``k`` / ``k:std`` for every metric
    key of the runs (primary keys first), and ``delta_m`` / ``delta_m:std`` (percent, over
    the primary keys) when the group has a run of ``baseline`` to compare against.
    """
    rows = []
    groups: dict[tuple, list[Mapping]] = {}
    for r in results:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    for values, in_group in groups.items():
        base_runs = [r for r in in_group if r["method"] == baseline]
        for method in dict.fromkeys(r["method"] for r in in_group):
            runs = [r for r in in_group if r["method"] == method]
            row: dict = {**dict(zip(group, values, strict=True)), "method": method,
                         "seeds": len(runs)}
            keys = [k for k in primary if all(k in r["metrics"] for r in runs)]
            keys += [k for k in dict.fromkeys(k for r in runs for k in r["metrics"])
                     if k not in keys and all(k in r["metrics"] for r in runs)]
            for k in keys:
                values_k = [float(r["metrics"][k]) for r in runs]
                row[k] = float(np.mean(values_k))
                row[f"{k}:std"] = float(np.std(values_k))
            gains = _gains(runs, base_runs, [k for k in primary if k in row], better)
            if gains is not None:
                row["delta_m"] = float(np.mean(gains))
                row["delta_m:std"] = float(np.std(gains))
            if all("run_dir" in r for r in runs):
                row["runs"] = ";".join(str(r["run_dir"]) for r in runs)
            rows.append(row)
    return rows


def _gains(runs, base_runs, keys, better) -> list[float] | None:
    keys = [k for k in keys if all(k in r["metrics"] for r in base_runs)]
    if not base_runs or not keys:
        return None
    base = {k: float(np.mean([r["metrics"][k] for r in base_runs])) for k in keys}
    try:
        return [delta_m({k: r["metrics"][k] for k in keys}, base, better) for r in runs]
    except ValueError:  # a baseline value of 0: the relative gain is undefined
        return None


def missing_baseline(rows: Sequence[Mapping], baseline: str, group: Sequence[str]) -> list[str]:
    """Groups (as text) without a run of the baseline method, where Delta_m is left out."""
    groups = dict.fromkeys(tuple(r[g] for g in group) for r in rows)
    have = {tuple(r[g] for g in group) for r in rows if r["method"] == baseline}
    return [" / ".join(map(str, g)) for g in groups if g not in have]


# -- tables: the evaluation split's, then one per source ------------------------------------

@dataclass(frozen=True)
class Table:
    """The rows of one table and the metrics of its Delta_m (also its metric columns)."""

    source: str | None
    """None: the evaluation split (``eval/``); else a cross-dataset source's label."""
    rows: list[dict]
    primary: list[str]
    better: dict[str, bool]

    @property
    def eval_set(self) -> str:
        return "eval" if self.source is None else self.source


def source_names(results: Sequence[Mapping]) -> list[str]:
    """Sources with their own metrics (``metrics@<source>``), in order of first appearance."""
    return list(dict.fromkeys(k.removeprefix(SOURCE) for r in results for k in r
                              if k.startswith(SOURCE)))


def on_source(results: Sequence[Mapping], source: str) -> list[dict]:
    """The runs evaluated on ``source``, with that source's metrics as their ``metrics``."""
    return [{**r, "metrics": r[SOURCE + source]} for r in results if SOURCE + source in r]


def build_tables(
    results: Sequence[Mapping],
    baseline: str,
    group: Sequence[str],
    chosen: Sequence[str] | None = None,
) -> list[Table]:
    """The evaluation split's table, then one per source of cross-dataset runs.

    ``chosen`` keys that no table has are an error (a typo would silently drop a task).
    """
    sets = [(None, list(results))] + [(s, on_source(results, s)) for s in source_names(results)]
    if chosen is not None:
        have = {k for _, runs in sets for r in runs for k in r["metrics"]}
        unknown = [k for k in chosen if k not in have]
        if unknown:
            raise ConfigError(f"{DELTA_KEY}: {unknown} are not metrics of the runs; they have "
                              f"{sorted(have)}")
    tables = []
    for source, runs in sets:
        primary, better = table_metrics((k for r in runs for k in r["metrics"]), chosen)
        rows = summarise(runs, primary, better, baseline, group)
        tables.append(Table(source, rows, primary, better))
    return tables


def table_rows(tables: Sequence[Table]) -> list[dict]:
    """Every table's rows for one CSV; an ``eval_set`` column first when there are sources."""
    if len(tables) == 1:
        return list(tables[0].rows)
    return [{"eval_set": t.eval_set, **row} for t in tables for row in t.rows]


def _source_title(table: Table, latex: bool = False) -> str:
    keys = ", ".join(table.primary) or "no shared metric"
    if latex:
        return f"% evaluated on source {table.source}; Delta_m over {keys}"
    return f"Evaluated on source {table.source} (Δm over {keys}):"


def tables_markdown(tables: Sequence[Table], baseline: str, group: Sequence[str]) -> str:
    """The Markdown tables, each source's under a line naming it and its Delta_m metrics."""
    parts = []
    for t in tables:
        if t.source is not None:
            parts.append(_source_title(t))
        parts.append(markdown_table(t.rows, t.primary, t.better, baseline, group))
    return "\n\n".join(parts)


def tables_latex(tables: Sequence[Table], baseline: str, group: Sequence[str]) -> str:
    """One ``tabular`` per table, each source's after a comment naming it."""
    parts = []
    for t in tables:
        head = _source_title(t, latex=True) + "\n" if t.source is not None else ""
        parts.append(head + latex_table(t.rows, t.primary, t.better, baseline, group))
    return "\n".join(parts)


# -- rendering -------------------------------------------------------------------------------

def _num(value: float) -> str:
    text = f"{value:.4f}"
    return text[1:] if text == "-0.0000" else text  # a rounding residue, not a sign


def _pm(mean: float, std: float, n: int) -> str:
    return f"{_num(mean)} ± {_num(std)}" if n > 1 else _num(mean)


def _has_delta(rows: Sequence[Mapping]) -> bool:
    return any("delta_m" in r for r in rows)


def markdown_table(
    rows: Sequence[Mapping],
    primary: Sequence[str],
    better: Mapping[str, bool],
    baseline: str,
    group: Sequence[str] = ("regime",),
) -> str:
    """Group columns, method, seeds, each primary metric (mean ± std) and Delta_m.

    The Delta_m column is left out when no row has one (the baseline ran nowhere).
    """
    header = [*group, "method", "seeds"] + [f"{k} {ARROWS[better[k]]}" for k in primary]
    if _has_delta(rows):
        header.append(f"Δm % vs {baseline} ↑")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[g]) for g in group] + [row["method"], str(row["seeds"])]
        cells += [_pm(row[k], row[f"{k}:std"], row["seeds"]) if k in row else "–"
                  for k in primary]
        if _has_delta(rows):
            cells.append(_pm(row["delta_m"], row["delta_m:std"], row["seeds"])
                         if "delta_m" in row else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def best_rows(rows: Sequence[Mapping], key: str, higher: bool) -> set[int]:
    """Indices of the rows with the best (displayed, 4-decimal) mean of ``key``; NaN never."""
    values = {i: round(r[key], 4) for i, r in enumerate(rows)
              if key in r and not math.isnan(r[key])}
    if not values:
        return set()
    best = (max if higher else min)(values.values())
    return {i for i, v in values.items() if v == best}


def latex_table(
    rows: Sequence[Mapping],
    primary: Sequence[str],
    better: Mapping[str, bool],
    baseline: str,
    group: Sequence[str] = ("regime",),
) -> str:
    """A booktabs ``tabular``: the columns of :func:`markdown_table`, arrows in the header,
    the best value of each column in bold within each group (e.g. dataset and regime: only
    runs under the same labels compete), groups separated by ``\\midrule``."""
    delta = _has_delta(rows)
    n_text = len(group) + 1
    spec = "l" * n_text + "r" * (1 + len(primary) + delta)
    header = [tex_escape(g.capitalize()) for g in group] + ["Method", "Seeds"]
    header += [f"{tex_escape(k)} {TEX_ARROWS[better[k]]}" for k in primary]
    if delta:
        header.append(rf"$\Delta_m$ vs {tex_escape(baseline)} (\%) {TEX_ARROWS[True]}")
    lines = ["% mtpsl report: needs \\usepackage{booktabs}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(tuple(r[g] for g in group), []).append(r)
    for n, in_group in enumerate(groups.values()):
        if n:
            lines.append(r"\midrule")
        columns = [(k, f"{k}:std", better[k]) for k in primary]
        if delta:
            columns.append(("delta_m", "delta_m:std", True))
        bold = {key: best_rows(in_group, key, higher) for key, _, higher in columns}
        for i, row in enumerate(in_group):
            cells = [tex_escape(row[g]) for g in group]
            cells += [tex_escape(row["method"]), str(row["seeds"])]
            for key, std_key, _ in columns:
                if key not in row:
                    cells.append("--")
                    continue
                text = _pm(row[key], row[std_key], row["seeds"]).replace("±", r"\pm")
                text = "-" if math.isnan(row[key]) else text
                cells.append(rf"$\mathbf{{{text}}}$" if i in bold[key] else f"${text}$")
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping], path: str | Path) -> None:
    """Every column of every row (all metrics with their std), empty where a row lacks one."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


# -- mtpsl report ----------------------------------------------------------------------------

def _ordered(results: list[dict], baseline: str) -> list[dict]:
    """Group by dataset, regime (first appearance), the baseline method first in each group."""
    first = {}
    for n, r in enumerate(results):
        first.setdefault(("d", r["dataset"]), n)
        first.setdefault(("r", r["dataset"], r["regime"]), n)
        first.setdefault(("m", r["dataset"], r["regime"], r["method"]), n)
    return sorted(results, key=lambda r: (
        first[("d", r["dataset"])], first[("r", r["dataset"], r["regime"])],
        r["method"] != baseline, first[("m", r["dataset"], r["regime"], r["method"])],
    ))


def build_report(
    paths: Sequence[str | Path], baseline: str = "stl", delta_metrics: Sequence[str] | None = None
) -> dict:
    """Load the runs under ``paths`` and build the report's tables (rows and rendered text).

    Delta_m uses ``delta_metrics``, else the runs' ``compare.delta_metrics`` when they all
    agree, else each task's primary metric.
    """
    results = _ordered([load_result(p) for p in find_runs(paths)], baseline)
    notes = []
    chosen, origin = _delta_choice(results, delta_metrics, notes)
    tables = build_tables(results, baseline, REPORT_GROUP, chosen)
    rows = tables[0].rows
    lacking = missing_baseline(rows, baseline, REPORT_GROUP)
    if lacking:
        n_groups = len({tuple(r[g] for g in REPORT_GROUP) for r in rows})
        where = "anywhere" if len(lacking) == n_groups else "under " + "; ".join(lacking)
        notes.append(f"note: baseline method {baseline!r} not found {where}; "
                     "Δm is omitted there")
    n_seeds = sorted({r["seeds"] for r in rows})
    notes.append(f"{len(results)} runs; mean ± std (population, ddof=0) over "
                 f"{'/'.join(map(str, n_seeds))} seed(s); Δm in % over {origin}, "
                 f"each run against the mean of {baseline!r} under the same dataset and regime"
                 f"{' (and source)' if len(tables) > 1 else ''}.")
    markdown = tables_markdown(tables, baseline, REPORT_GROUP)
    markdown += "\n\n" + "\n".join(notes) + "\n"
    first = tables[0]
    return {"rows": rows, "primary": first.primary, "better": first.better, "tables": tables,
            "markdown": markdown, "latex": tables_latex(tables, baseline, REPORT_GROUP),
            "runs": [r["run_dir"] for r in results]}


def _delta_choice(
    results: Sequence[Mapping], given: Sequence[str] | None, notes: list[str]
) -> tuple[list[str] | None, str]:
    """The Delta_m keys (None: primary metrics) and how they were chosen, for the notes."""
    if given is not None:
        return list(given), f"{', '.join(given)} (--delta-metrics)"
    choices = {r.get("delta_metrics") for r in results}
    if len(choices) == 1 and None not in choices:
        keys = list(next(iter(choices)))
        return keys, f"{', '.join(keys)} (compare.delta_metrics of the runs)"
    if len(choices) > 1:
        notes.append("note: the runs' configs disagree on compare.delta_metrics; "
                     "each task's primary metric is used (see --delta-metrics)")
    return None, "each task's primary metric"


def default_out(paths: Sequence[str | Path]) -> Path:
    """The deepest folder holding every argument (a grid folder itself for one argument)."""
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))


def write_report(report: Mapping, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.csv", out / "report.tex"]
    paths[0].write_text(report["markdown"])
    write_csv(table_rows(report["tables"]), paths[1])
    paths[2].write_text(report["latex"])
    return paths
