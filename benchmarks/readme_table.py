"""Write the README's demo table from the committed demo record, or check that it matches.

    python benchmarks/readme_table.py           # rewrite the block in README.md
    python benchmarks/readme_table.py --check   # exit 1 if README.md differs from the record

The block between ``<!-- demo-table -->`` and ``<!-- /demo-table -->`` is the table that
``mtpsl compare`` prints for the runs in ``benchmarks/results/synthetic_demo_cpu.json``
(rendered by the same code, :func:`mtpsl.report.tables_markdown`), followed by the measured
training time. The record is written by ``python benchmarks/grid_run.py --device cpu``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mtpsl import report
from mtpsl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "synthetic_demo_cpu.json"
README = ROOT / "README.md"
BEGIN, END = "<!-- demo-table -->", "<!-- /demo-table -->"


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


def current_block(readme: str) -> str:
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{README}: no {BEGIN} ... {END} block")
    return readme[start:end + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    record = json.loads(RECORD.read_text())
    readme = README.read_text()
    want, have = block(record), current_block(readme)
    if args.check:
        if want != have:
            print(f"{README} differs from {RECORD}: run python benchmarks/readme_table.py",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(readme.replace(have, want))
    print(f"wrote the demo table of {RECORD.name} into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
