"""Result tables over finished runs: ``mtpsl report`` and the tables of ``mtpsl compare``.

Rows are set-ups (:mod:`mtpsl.core.signature`): the runs of one row differ only in their seed, and
the same seed twice in a row is an error. Rows are named by what differs between them, and
grouped by context (the set-up without its method section). Per row and metric: the mean, the
sample std and the 95% Student-t interval over seeds (:mod:`mtpsl.analysis.stats`). Against the
baseline row of the same context the comparison is paired: each run against the baseline's run
of the same seed and split, per metric and for the multi-task gain Delta_m, with the paired
t-test's verdict; ``contrasts`` (``a:b``) add verdicts between other rows.

Cross-dataset runs (``final_metrics.json`` holding ``metrics@<source>``) get one more table
per source, built the same way from that source's metrics.

The metrics of Delta_m (and the tables' columns) are each task's primary metric
(``Task.primary_metric``, recognised from the metric keys alone, see
:func:`infer_primary_keys`), unless ``compare.delta_metrics`` (or ``--delta-metrics``) names
them, e.g. ``[semantic/miou, depth/rmse]`` for SemiMTL. :func:`table_metrics` is the one place
that decides, for compare and report alike.

This module holds the one implementation of the tables: :func:`build_tables` (over
:func:`summarise`) builds the rows, :func:`tables_markdown`, :func:`tables_latex` and
:func:`write_csv` render them, for ``mtpsl report`` and ``mtpsl compare`` alike.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpsl.analysis import stats
from mtpsl.core.config import parse_yaml
from mtpsl.core.errors import ConfigError, DataError, MtpslError
from mtpsl.core.files import write_all, write_text
from mtpsl.core.signature import (
    METHOD_SECTION,
    context_of,
    labels,
    setup_from_config,
    signature,
    without_per_seed,
)
from mtpsl.metrics import METRICS, delta_m
from mtpsl.tasks import TASKS

ARROWS = {True: "↑", False: "↓"}
TEX_ARROWS = {True: r"$\uparrow$", False: r"$\downarrow$"}
FINAL = "final_metrics.json"
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
        for name, key in task_cls.alternative_metrics.items():
            primaries.setdefault(name, key)
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
    """A run folder's final metrics as a table input (see :func:`result_of`)."""
    run_dir = Path(run_dir)
    try:
        final = json.loads((run_dir / FINAL).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{run_dir / FINAL}: cannot be read ({err})") from None
    return result_of(final, _saved_config(run_dir / "config.yaml"), run_dir)


def result_of(final: Mapping, config: Mapping | None, run_dir: str | Path) -> dict:
    """``final_metrics.json`` with its set-up, signature and context (see
    :mod:`mtpsl.core.signature`) and ``run_dir``.

    Runs written before set-ups were recorded get theirs from the config, with the dataset
    root standing in for the datasets' fingerprints.
    """
    missing = [k for k in ("method", "regime", "metrics") if k not in final]
    if missing:
        raise DataError(f"{Path(run_dir) / FINAL}: lacks {', '.join(missing)}")
    config = config or {}
    setup = final.get("setup")
    if isinstance(setup, dict):
        setup = without_per_seed(copy.deepcopy(setup))
    else:
        setup = setup_from_config(config)
        root = (config.get("dataset") or {}).get("root")
        setup["data"] = {"root": str(root)} if root is not None else {}
        setup.setdefault("method", {})["name"] = final["method"]
        setup.setdefault("labels", {})["regime"] = final["regime"]
    chosen = (config.get("compare") or {}).get("delta_metrics")
    # Tables name a run by its label (a compare variant, e.g. pcgrad) rather than the
    # method it runs (sl); the row names then add what else differs.
    return {**final, "method": final.get("label") or final["method"], "setup": setup,
            "signature": signature(setup), "context": signature(context_of(setup)),
            "delta_metrics": None if chosen is None else tuple(chosen),
            "run_dir": str(run_dir)}


def _saved_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return parse_yaml(path.read_text(), str(path)) or {}
    except ConfigError as err:  # the bounded loader's one line, as a data problem here
        raise DataError(str(err)) from None


# -- rows ------------------------------------------------------------------------------------

def set_ups(results: Sequence[Mapping], baseline: str) -> list[list[Mapping]]:
    """The runs grouped by set-up signature (first appearance), the baseline's groups
    first within each context. The same seed twice in one set-up is an error naming both."""
    groups: dict[str, list[Mapping]] = {}
    for r in results:
        groups.setdefault(r["signature"], []).append(r)
    for runs in groups.values():
        seen: dict = {}
        for r in runs:
            if r.get("seed") is not None and r["seed"] in seen:
                raise DataError(
                    f"runs {seen[r['seed']]} and {r['run_dir']} are one set-up with the same "
                    f"seed {r['seed']}: a seed counts once; remove one of them or rerun it "
                    "with another seed")
            seen[r.get("seed")] = r["run_dir"]
    contexts = list(dict.fromkeys(runs[0]["context"] for runs in groups.values()))
    return sorted(groups.values(), key=lambda runs: (contexts.index(runs[0]["context"]),
                                                     runs[0]["method"] != baseline))


def _takes_backbone(model: object) -> bool | None:
    """Whether the registered model ``model`` builds on ``model.backbone`` (its builder takes
    a ``backbone``); None for a model this installation does not know."""
    import inspect

    from mtpsl.models import MODELS

    if not isinstance(model, str) or model not in MODELS.names():
        return None
    return "backbone" in inspect.signature(MODELS.get(model)).parameters


def meaningful(setup: Mapping) -> dict:
    """``setup`` without the keys its model ignores, for naming rows: ``model.backbone`` of
    a model without an encoder (SegNet, MTAN), and of an encoder the keys of the other
    encoder (``depth`` of ``resnet``, ``arch`` of ``timm``). Signatures keep every key."""
    out = json.loads(json.dumps(dict(setup)))
    model = out.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("backbone"), dict):
        return out
    takes = _takes_backbone(model.get("name"))
    if takes is False:
        del model["backbone"]
    elif takes:
        backbone = model["backbone"]
        unused = {"resnet": ("arch",), "timm": ("depth",)}.get(backbone.get("name"), ())
        for key in unused:
            backbone.pop(key, None)
    return out


def _row_names(groups: Sequence[Sequence[Mapping]]) -> tuple[list[str], list[str]]:
    """(set-up column, method column) of each group: what differs between the contexts
    (among the keys meaningful for each one's model, see :func:`meaningful`), and the run
    label plus what else differs in the method section."""
    first = [g[0] for g in groups]
    contexts = list(dict.fromkeys(r["context"] for r in first))
    by_context = {r["context"]: context_of(meaningful(r["setup"])) for r in first}
    context_names = dict(zip(contexts, labels([by_context[c] for c in contexts]), strict=True))
    columns = [context_names[r["context"]] if len(contexts) > 1 else "" for r in first]
    methods = labels([{METHOD_SECTION: r["setup"].get(METHOD_SECTION, {})} for r in first],
                     first=[r["method"] for r in first], skip=[f"{METHOD_SECTION}.name"],
                     within=columns)
    return columns, methods


def summarise(
    results: Sequence[Mapping],
    primary: Sequence[str],
    better: Mapping[str, bool],
    baseline: str,
) -> list[dict]:
    """One row per set-up, grouped by context, the baseline's row first in each.

    Each row: ``setup`` (the context's name, empty with one context), ``method``, ``seeds``,
    then per metric key (primary keys first) the mean ``k``, and with two seeds or more
    ``k:std`` (sample), ``k:ci_low``/``k:ci_high`` (95%, Student t). Against the context's
    baseline row, over the seeds both ran with the same split: ``delta_m`` (percent, over the
    primary keys) and ``k:diff`` with the same statistics, ``pairs`` and ``verdict``.
    Columns starting with ``_`` hold per-seed values for figures.
    """
    groups = set_ups(results, baseline)
    contexts, names = _row_names(groups)
    rows = [_seed_row(runs, context, name, primary)
            for runs, context, name in zip(groups, contexts, names, strict=True)]
    row_of = {id(runs): row for runs, row in zip(groups, rows, strict=True)}
    base_of = _baselines(groups, baseline)
    for runs, row in zip(groups, rows, strict=True):
        base = base_of.get(runs[0]["context"])
        if base is not None:
            _compare(row, row_of[id(base)], [k for k in primary if k in row["_points"]],
                     better, is_baseline=base is runs)
        row["signature"] = runs[0]["signature"]
        if all("run_dir" in r for r in runs):
            row["runs"] = ";".join(str(r["run_dir"]) for r in runs)
    return rows


def _seed_row(runs: Sequence[Mapping], context: str, name: str, primary: Sequence[str]
              ) -> dict:
    """A row's per-seed values (``_`` columns) and its statistics over seeds."""
    row: dict = {"setup": context, "method": name, "seeds": len(runs),
                 "seed_list": ",".join(str(r.get("seed")) for r in runs)}
    keys = [k for k in primary if all(k in r["metrics"] for r in runs)]
    keys += [k for k in dict.fromkeys(k for r in runs for k in r["metrics"])
             if k not in keys and all(k in r["metrics"] for r in runs)]
    row["_points"] = {k: {r.get("seed"): float(r["metrics"][k]) for r in runs} for k in keys}
    row["_label"], row["_context"] = runs[0]["method"], runs[0]["context"]
    pairing = [(r.get("seed"), r.get("pairing") or {}) for r in runs]
    row["_splits"] = {seed: p.get("split") for seed, p in pairing}
    row["_initial"] = {seed: p.get("initial_weights") for seed, p in pairing}
    for k in keys:
        _put(row, k, stats.summarise(list(row["_points"][k].values())))
    return row


def _baselines(groups: Sequence[Sequence[Mapping]], baseline: str
               ) -> dict[str, Sequence[Mapping]]:
    """Each context's one baseline set-up (a context with two has none: it is ambiguous)."""
    found: dict[str, list[Sequence[Mapping]]] = {}
    for runs in groups:
        if runs[0]["method"] == baseline:
            found.setdefault(runs[0]["context"], []).append(runs)
    return {c: g[0] for c, g in found.items() if len(g) == 1}  # the group itself: ids matter


def _put(row: dict, key: str, summary: stats.Summary) -> None:
    row[key] = summary.mean
    if summary.n > 1:
        row[f"{key}:std"] = summary.std
        row[f"{key}:ci_low"], row[f"{key}:ci_high"] = summary.low, summary.high


def _paired(row: Mapping, other: Mapping, keys: Sequence[str], better: Mapping[str, bool]
            ) -> tuple[list[str], dict] | None:
    """The keys both rows have and, per seed both ran with the same split, the Delta_m of
    ``row`` against ``other`` over them: the units of a paired comparison. None when no key or
    seed is shared, or Delta_m is undefined (a value of 0 in ``other``)."""
    keys = [k for k in keys if k in row["_points"] and k in other["_points"]]
    seeds = [s for s in row["_splits"] if s is not None and s in other["_splits"]
             and row["_splits"][s] == other["_splits"][s]]
    if not keys or not seeds:
        return None
    try:
        return keys, {s: delta_m({k: row["_points"][k][s] for k in keys},
                                 {k: other["_points"][k][s] for k in keys}, better)
                      for s in seeds}
    except ValueError:
        return None


def _compare(row: dict, base: Mapping, keys: Sequence[str], better, is_baseline: bool) -> None:
    """Paired Delta_m and per-metric differences of ``row`` against the baseline row."""
    paired = _paired(row, base, keys, better)
    if paired is None:
        return
    keys, gains = paired
    row["pairs"] = len(gains)
    row["_delta_points"] = gains
    summary = stats.summarise(list(gains.values()))
    _put(row, "delta_m", summary)
    if is_baseline:
        return
    for k in keys:
        _put(row, f"{k}:diff", stats.summarise(
            [row["_points"][k][s] - base["_points"][k][s] for s in gains]))
    row["verdict"] = stats.verdict(summary)
    row["same_initial_weights"] = all(
        row["_initial"][s] is not None and row["_initial"][s] == base["_initial"][s]
        for s in gains)


def contrast(row: Mapping, other: Mapping, primary: Sequence[str], better: Mapping[str, bool]
             ) -> stats.Summary | None:
    """Paired Delta_m of ``row`` against ``other`` (two rows of one table, same context) over
    the seeds both ran with the same split; None when Delta_m is undefined for them."""
    paired = _paired(row, other, primary, better)
    return None if paired is None else stats.summarise(list(paired[1].values()))


def contrast_lines(rows: Sequence[Mapping], pairs: Sequence[str], primary: Sequence[str],
                   better: Mapping[str, bool]) -> list[str]:
    """A verdict line per ``a:b`` of ``pairs`` (run labels) and per context holding both."""
    lines: list[str] = []
    for pair in pairs:
        a, _, b = pair.partition(":")
        before = len(lines)
        for row in rows:
            other = next((o for o in rows if o["_label"] == b
                          and o["_context"] == row["_context"]), None)
            if row["_label"] != a or other is None:
                continue
            summary = contrast(row, other, primary, better)
            if summary is not None:
                lines.append(_verdict_line(row["method"], other["method"], row["setup"],
                                           summary))
        if len(lines) == before:  # a typo must not pass for "nothing to say"
            lines.append(f"- {a} vs {b}: no set-up holds both with a shared seed; not compared")
    return lines


def missing_baseline(rows: Sequence[Mapping]) -> list[str]:
    """Set-ups (as text) without one baseline set-up to pair with, where Delta_m is left out."""
    have = {r["setup"] for r in rows if "delta_m" in r}
    return list(dict.fromkeys(r["setup"] or "all runs" for r in rows if r["setup"] not in have))


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
    results: Sequence[Mapping], baseline: str, chosen: Sequence[str] | None = None
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
        tables.append(Table(source, summarise(runs, primary, better, baseline), primary,
                            better))
    return tables


def table_rows(tables: Sequence[Table]) -> list[dict]:
    """Every table's rows for one CSV (without the per-seed ``_`` columns); an ``eval_set``
    column first when there are sources."""
    rows = [{k: v for k, v in row.items() if not k.startswith("_")}
            for t in tables for row in t.rows]
    if len(tables) == 1:
        return rows
    sets = [t.eval_set for t in tables for _ in t.rows]
    return [{"eval_set": s, **row} for s, row in zip(sets, rows, strict=True)]


def _source_title(table: Table, latex: bool = False) -> str:
    keys = ", ".join(table.primary) or "no shared metric"
    if latex:
        return f"% evaluated on source {table.source}; Delta_m over {keys}"
    return f"Evaluated on source {table.source} (Δm over {keys}):"


def tables_markdown(tables: Sequence[Table], baseline: str, contrasts: Sequence[str] = ()
                    ) -> str:
    """Each table with its paired comparisons and verdicts (against the baseline, then for
    each ``a:b`` of ``contrasts``), each source's under a line naming it and its Delta_m
    metrics, then a legend saying how the numbers were made."""
    parts = []
    for t in tables:
        if t.source is not None:
            parts.append(_source_title(t))
        parts.append(markdown_table(t.rows, t.primary, t.better, baseline))
        if any(":diff" in k for r in t.rows for k in r):
            parts.append(f"Paired against {baseline} (mean difference [95% CI] over the "
                         "seeds both ran with the same split; * = the interval excludes 0):")
            parts.append(paired_table(t.rows, t.primary, t.better))
        lines = verdict_lines(t.rows, baseline)
        lines += contrast_lines(t.rows, contrasts, t.primary, t.better)
        if lines:
            parts.append("\n".join(dict.fromkeys(lines)))  # a contrast may repeat one
    parts.append(legend(tables))
    return "\n\n".join(parts)


def legend(tables: Sequence[Table]) -> str:
    n_seeds = sorted({r["seeds"] for t in tables for r in t.rows})
    text = (f"Rows are set-ups (runs identical but for the seed); {'/'.join(map(str, n_seeds))}"
            " seed(s) each; mean ± half-width of the 95% Student-t interval of the mean "
            "(sample std in the CSV). Δm: each run against the baseline's run of the same "
            "seed and split (and the same initial weights where the networks are the same: "
            f"same_initial_weights in the CSV), mean [95% CI]; significance: {stats.TEST}.")
    if any(r["seeds"] < stats.MIN_SEEDS for t in tables for r in t.rows):
        text += (f" Set-ups with fewer than {stats.MIN_SEEDS} seeds support no conclusion: "
                 "their differences are reported, not judged.")
    return text


def tables_latex(tables: Sequence[Table], baseline: str) -> str:
    """One ``tabular`` per table, each source's after a comment naming it."""
    parts = []
    for t in tables:
        head = _source_title(t, latex=True) + "\n" if t.source is not None else ""
        parts.append(head + latex_table(t.rows, t.primary, t.better, baseline))
    return "\n".join(parts)


# -- rendering -------------------------------------------------------------------------------

def _num(value: float) -> str:
    text = f"{value:.4f}"
    return text[1:] if text == "-0.0000" else text  # a rounding residue, not a sign


def _pm(row: Mapping, key: str, fmt=_num) -> str:
    """``mean ± half-width`` of the 95% interval, the mean alone for one seed."""
    if f"{key}:ci_low" not in row:
        return fmt(row[key])
    half = (row[f"{key}:ci_high"] - row[f"{key}:ci_low"]) / 2
    return f"{fmt(row[key])} ± {_num(half) if fmt is _num else f'{half:.2f}'}"


def _signed(value: float, digits: int = 2) -> str:
    text = f"{value:+.{digits}f}"
    return text.replace("-", "+", 1) if float(text) == 0 else text


def _interval(row: Mapping, key: str, digits: int = 2) -> str:
    """``mean [low, high]`` with a ``*`` when a conclusive interval excludes 0."""
    mean = _signed(row[key], digits)
    if f"{key}:ci_low" not in row:
        return mean
    low, high = row[f"{key}:ci_low"], row[f"{key}:ci_high"]
    mark = " *" if row["pairs"] >= stats.MIN_SEEDS and (low > 0 or high < 0) else ""
    return f"{mean} [{_signed(low, digits)}, {_signed(high, digits)}]{mark}"


def _has_delta(rows: Sequence[Mapping]) -> bool:
    return any("delta_m" in r for r in rows)


def _lead(rows: Sequence[Mapping]) -> list[str]:
    return ["set-up"] if any(r["setup"] for r in rows) else []


def _lead_cells(row: Mapping, lead: Sequence[str]) -> list[str]:
    return [row["setup"]] * len(lead) + [row["method"]]


def _delta_cell(row: Mapping, baseline_row: bool) -> str:
    if "delta_m" not in row:
        return "n/a"
    return "0 (baseline)" if baseline_row else _interval(row, "delta_m")


def markdown_table(
    rows: Sequence[Mapping], primary: Sequence[str], better: Mapping[str, bool], baseline: str
) -> str:
    """Set-up (when several), method, seeds, each primary metric (mean ± 95% CI) and Delta_m.

    The Delta_m column is left out when no row has one (the baseline ran nowhere).
    """
    lead = _lead(rows)
    header = [*lead, "method", "seeds"] + [f"{k} {ARROWS[better[k]]}" for k in primary]
    if _has_delta(rows):
        header.append(f"Δm % vs {baseline} ↑")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [*_lead_cells(row, lead), str(row["seeds"])]
        cells += [_pm(row, k) if k in row else "–" for k in primary]
        if _has_delta(rows):
            cells.append(_delta_cell(row, "verdict" not in row))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(rows: Sequence[Mapping], primary: Sequence[str], better: Mapping[str, bool]
                 ) -> str:
    """Per non-baseline row: paired pairs, per-metric differences, Delta_m and the verdict."""
    lead = _lead(rows)
    header = [*lead, "method", "pairs"] + [f"Δ {k} {ARROWS[better[k]]}" for k in primary]
    header += ["Δm % ↑", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "verdict" not in row:
            continue
        cells = [*_lead_cells(row, lead), str(row["pairs"])]
        cells += [_interval(row, f"{k}:diff", 4) if f"{k}:diff" in row else "–"
                  for k in primary]
        cells += [_interval(row, "delta_m"), row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(rows: Sequence[Mapping], baseline: str) -> list[str]:
    """``- xtc vs stl: Δm −4.1% [−9.0, +0.8] over 3 paired seeds: not significant``."""
    lines = []
    for row in rows:
        if "verdict" in row:
            summary = stats.Summary(row["pairs"], row["delta_m"], row.get("delta_m:std", math.nan),
                                    row.get("delta_m:ci_low", math.nan),
                                    row.get("delta_m:ci_high", math.nan))
            lines.append(_verdict_line(row["method"], baseline, row["setup"], summary))
    return lines


def _verdict_line(name: str, against: str, setup: str, summary: stats.Summary) -> str:
    where = f" ({setup})" if setup else ""
    interval = ""
    if math.isfinite(summary.low):
        interval = f" [{_signed(summary.low, 1)}, {_signed(summary.high, 1)}]"
    n = summary.n
    return (f"- {name} vs {against}{where}: Δm {_signed(summary.mean, 1)}%{interval} over {n} "
            f"paired seed{'s' * (n != 1)}: {stats.verdict(summary)}")


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
    rows: Sequence[Mapping], primary: Sequence[str], better: Mapping[str, bool], baseline: str
) -> str:
    """A booktabs ``tabular``: the columns of :func:`markdown_table` (± is the 95% interval's
    half-width), arrows in the header, the best mean of each column in bold within each
    set-up (only runs under the same context compete), set-ups separated by ``\\midrule``."""
    delta = _has_delta(rows)
    lead = _lead(rows)
    spec = "l" * (len(lead) + 1) + "r" * (1 + len(primary) + delta)
    header = [tex_escape(g.capitalize()) for g in lead] + ["Method", "Seeds"]
    header += [f"{tex_escape(k)} {TEX_ARROWS[better[k]]}" for k in primary]
    if delta:
        header.append(rf"$\Delta_m$ vs {tex_escape(baseline)} (\%) {TEX_ARROWS[True]}")
    lines = ["% mtpsl report: needs \\usepackage{booktabs}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(header) + r" \\",
             r"\midrule"]
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(r["setup"], []).append(r)
    columns = [(k, better[k]) for k in primary] + ([("delta_m", True)] if delta else [])
    for n, in_group in enumerate(groups.values()):
        if n:
            lines.append(r"\midrule")
        bold = {key: best_rows(in_group, key, higher) for key, higher in columns}
        for i, row in enumerate(in_group):
            cells = [tex_escape(c) for c in _lead_cells(row, lead)] + [str(row["seeds"])]
            for key, _ in columns:
                if key not in row:
                    cells.append("--")
                    continue
                text = _pm(row, key, _num if key != "delta_m" else _signed)
                text = "-" if math.isnan(row[key]) else text.replace("±", r"\pm")
                cells.append(rf"$\mathbf{{{text}}}$" if i in bold[key] else f"${text}$")
            lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping], path: str | Path) -> None:
    """Every column of every row (all metrics with their statistics), empty where a row
    lacks one."""
    write_text(path, csv_text(rows))


def csv_text(rows: Sequence[Mapping]) -> str:
    """:func:`write_csv`'s text."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# -- mtpsl report ----------------------------------------------------------------------------

def build_report(
    paths: Sequence[str | Path], baseline: str = "stl", delta_metrics: Sequence[str] | None = None,
    contrasts: Sequence[str] = (),
) -> dict:
    """Load the runs under ``paths`` and build the report's tables (rows and rendered text).

    Delta_m uses ``delta_metrics``, else the runs' ``compare.delta_metrics`` when they all
    agree, else each task's primary metric.
    """
    results = [load_result(p) for p in find_runs(paths)]
    return report_of(results, baseline, delta_metrics, contrasts)


def report_of(results: Sequence[Mapping], baseline: str,
              delta_metrics: Sequence[str] | None = None, contrasts: Sequence[str] = ()
              ) -> dict:
    """The tables of loaded runs, rendered, with notes on what was chosen and left out."""
    notes: list[str] = []
    chosen, origin = _delta_choice(results, delta_metrics, notes)
    tables = build_tables(results, baseline, chosen)
    rows = tables[0].rows
    lacking = missing_baseline(rows)
    if lacking:
        n_setups = len({r["setup"] for r in rows})
        where = "anywhere" if len(lacking) == n_setups else "under " + "; ".join(lacking)
        notes.append(f"note: no single set-up of baseline {baseline!r} found {where}; "
                     "Δm is omitted there")
    notes.append(f"{len(results)} runs; Δm in % over {origin}, against {baseline!r} under the "
                 f"same set-up{' (and source)' if len(tables) > 1 else ''}.")
    markdown = tables_markdown(tables, baseline, contrasts) + "\n\n" + "\n".join(notes) + "\n"
    first = tables[0]
    return {"rows": rows, "primary": first.primary, "better": first.better, "tables": tables,
            "markdown": markdown, "latex": tables_latex(tables, baseline),
            "runs": [r["run_dir"] for r in results]}


def _delta_choice(
    results: Sequence[Mapping], given: Sequence[str] | None, notes: list[str]
) -> tuple[list[str] | None, str]:
    """The Delta_m keys (None: primary metrics) and how they were chosen, for the notes."""
    if given is not None:
        return list(given), f"{', '.join(given)} (--delta-metrics)"
    choices = {r.get("delta_metrics") for r in results}
    if len(choices) == 1 and None not in choices:
        keys = list(next(iter(choices)) or ())
        return keys, f"{', '.join(keys)} (compare.delta_metrics of the runs)"
    if len(choices) > 1:
        notes.append("note: the runs' configs disagree on compare.delta_metrics; "
                     "each task's primary metric is used (see --delta-metrics)")
    return None, "each task's primary metric"


def default_out(paths: Sequence[str | Path]) -> Path:
    """The deepest folder holding every argument (a grid folder itself for one argument)."""
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))


def write_report(report: Mapping, out: str | Path) -> list[Path]:
    """report.md/.csv/.tex (the per-seed figure is drawn by
    :func:`mtpsl.analysis.figures.seeds.plot_seeds`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.md", out / "report.csv", out / "report.tex"]
    texts = [report["markdown"], csv_text(table_rows(report["tables"])), report["latex"]]
    write_all({path: text.encode() for path, text in zip(paths, texts, strict=True)})
    return paths
