"""``mtpsl report RUN_DIR...``: tables (Markdown, CSV, LaTeX) and the per-seed figure of
finished runs, one row per set-up, with intervals and paired verdicts."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="tables (md, csv, tex) and a per-seed figure of finished runs: one "
        "row per set-up, mean and 95%% interval over seeds, paired Δm with a verdict",
        description="Aggregate run folders (or folders holding runs below them, e.g. a "
        "compare grid) by set-up (everything but the seed; rows are named by what differs); "
        "write report.md, report.csv, report.tex and report.png/.pdf and print the Markdown. "
        "The same seed twice in one set-up is an error. Cross-dataset runs get one more "
        "table per source (its metrics@<source>), with Δm against the baseline on that "
        "source.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder, or a folder searched recursively for final_metrics.json")
    p.add_argument("--baseline", default="stl",
                   help="method (or variant label) that Δm is measured against, paired by "
                   "seed within each set-up (default: stl)")
    p.add_argument("--delta-metrics", metavar="KEYS",
                   help="comma-separated task/metric keys for Δm and the table columns, e.g. "
                   "semantic/miou,depth/rmse (default: the runs' compare.delta_metrics, else "
                   "each task's primary metric)")
    p.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="also judge A against B (method or variant labels), paired by seed; "
                   "repeatable, e.g. --contrast xtc:sl")
    p.add_argument("--out", help="folder for the report files (default: the deepest folder "
                   "holding every RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtpsl.analysis.figures.seeds import plot_seeds
    from mtpsl.analysis.report import build_report, default_out, write_report

    keys = None
    if args.delta_metrics:
        keys = [k.strip() for k in args.delta_metrics.split(",") if k.strip()] or None
    bad = [c for c in args.contrast if len(c.split(":")) != 2 or not all(c.split(":"))]
    if bad:
        from mtpsl.core.errors import MtpslError

        raise MtpslError(f"--contrast {bad[0]!r}: must look like A:B, e.g. xtc:sl")
    report = build_report(args.runs, args.baseline, keys, args.contrast)
    out = Path(args.out) if args.out else default_out(args.runs)
    write_report(report, out)
    plot_seeds(report["tables"][0], out / "report")
    print(report["markdown"], end="")
