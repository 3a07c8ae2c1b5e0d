"""Write the README's demo table and weighting-cost table from the committed records, or
check that they match.

    python benchmarks/readme_table.py           # rewrite the blocks in README.md
    python benchmarks/readme_table.py --check   # exit 1 if README.md differs from the records

The block between ``<!-- demo-table -->`` and ``<!-- /demo-table -->`` is the table that
``mtpsl compare`` prints for the runs in ``benchmarks/results/synthetic_demo_cpu.json``
(rendered by the same code, :func:`mtpsl.analysis.report.tables_markdown`), followed by the measured
training time. The record is written by ``python benchmarks/grid_run.py --device cpu``. The
block between ``<!-- weightings-table -->`` and ``<!-- /weightings-table -->`` is the table of
``benchmarks/results/weightings_cpu.json`` (``python benchmarks/bench_weightings.py``), the one
between ``<!-- weightings-full-width-table -->`` and its end that of
``weightings_cpu_full_width.json`` (the full-width SegNet, where the K task gradients weigh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mtpsl.analysis import report
from mtpsl.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "synthetic_demo_cpu.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- demo-table -->", "<!-- /demo-table -->"
WEIGHTINGS_TABLES = {name: (ROOT / "benchmarks" / "results" / f"{name}.json",
                             f"<!-- {tag}-table -->", f"<!-- /{tag}-table -->")
                     for name, tag in (("weightings_cpu", "weightings"),
                                       ("weightings_cpu_full_width", "weightings-full-width"))}
"""The weighting benchmark's records and the README markers of their tables."""


def demo_config(record: dict):
    """The demo preset with the record's overrides (its data folder, device)."""
    return load_config(record["benchmark"], record["overrides"])


def block(record: dict) -> str:
    """The README block for ``record``: the printed tables and the time they took."""
    config = demo_config(record)
    results = [report.result_of(run, None, run["name"]) for run in record["runs"]]
    tables = report.build_tables(results, config.compare.baseline, config.compare.delta_metrics)
    text = report.tables_markdown(tables, config.compare.baseline, config.compare.contrasts)
    seconds: dict[str, list[float]] = {}
    for run in record["runs"]:
        seconds.setdefault(run["label"], []).append(run["train_seconds_this_session"])
    per_method = ", ".join(f"{m} {statistics.mean(s):.0f} s" for m, s in seconds.items())
    total = sum(sum(s) for s in seconds.values())
    timing = (f"Measured: {total / 60:.1f} min of training in all ({len(record['runs'])} runs; "
              f"per run {per_method}) and {record['wall_seconds'] / 60:.1f} min wall time with "
              f"evaluation, on {record['device']} with {record['cpu_threads']} threads, torch "
              f"{record['torch']}.")
    return f"{BEGIN}\n{text}\n\n{timing}\n{END}"


def weightings_block(record: dict, begin: str, end: str) -> str:
    """The README block of the weighting benchmark: its table and what it was measured on."""
    setup = record["setup"]
    measured = (f"Measured on {record['device']}, torch {record['torch']}, {record['date']}: "
                f"{setup['method']} on {setup['tasks']} tasks, {setup['model']}, "
                f"{setup['height']}x{setup['width']}, batch {setup['batch_size']} "
                f"(`{record['command']}`).")
    return f"{begin}\n{record['table']}\n\n{measured}\n{end}"


def current_block(readme: str, begin: str = BEGIN, end_mark: str = END) -> str:
    start, end = readme.find(begin), readme.find(end_mark)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: no {begin} ... {end_mark} block")
    return readme[start:end + len(end_mark)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    readme = README.read_text()
    blocks = [(RECORD, block(json.loads(RECORD.read_text())), current_block(readme))]
    blocks += [(path, weightings_block(json.loads(path.read_text()), begin, end),
                current_block(readme, begin, end))
               for path, begin, end in WEIGHTINGS_TABLES.values()]
    if args.check:
        stale = [path.name for path, want, have in blocks if want != have]
        if stale:
            print(f"{README} differs from {', '.join(stale)}: run python "
                  f"benchmarks/readme_table.py", file=sys.stderr)
            return 1
        return 0
    for path, want, have in blocks:
        readme = readme.replace(have, want)
        print(f"wrote the table of {path.name} into {README}")
    README.write_text(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
