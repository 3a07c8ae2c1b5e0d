"""``mtpsl report RUN_DIR...``: mean ± std tables (Markdown, CSV, LaTeX) over finished runs."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="tables (md, csv, tex) of finished runs: mean ± std over seeds, Δm",
        description="Aggregate run folders (or folders holding runs below them, e.g. a "
        "compare grid) by dataset, regime and method; write report.md, report.csv and "
        "report.tex and print the Markdown table. Cross-dataset runs get one more table per "
        "source (its metrics@<source>), with Δm against the baseline on that source.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder, or a folder searched recursively for final_metrics.json")
    p.add_argument("--baseline", default="stl",
                   help="method that Δm is measured against, per dataset and regime "
                   "(default: stl)")
    p.add_argument("--delta-metrics", metavar="KEYS",
                   help="comma-separated task/metric keys for Δm and the table columns, e.g. "
                   "semantic/miou,depth/rmse (default: the runs' compare.delta_metrics, else "
                   "each task's primary metric)")
    p.add_argument("--out", help="folder for the report files (default: the deepest folder "
                   "holding every RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..report import build_report, default_out, write_report

    keys = None
    if args.delta_metrics:
        keys = [k.strip() for k in args.delta_metrics.split(",") if k.strip()] or None
    report = build_report(args.runs, args.baseline, keys)
    write_report(report, Path(args.out) if args.out else default_out(args.runs))
    print(report["markdown"], end="")
