"""``mtpsl report RUN_DIR...``: mean ± std tables (Markdown, CSV, LaTeX) over finished runs."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="tables (md, csv, tex) of finished runs: mean ± std over seeds, Δm",
        description="Aggregate run folders (or folders holding runs below them, e.g. a "
        "compare grid) by dataset, regime and method; write report.md, report.csv and "
        "report.tex and print the Markdown table.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder, or a folder searched recursively for final_metrics.json")
    p.add_argument("--baseline", default="stl",
                   help="method that Δm is measured against, per dataset and regime "
                   "(default: stl)")
    p.add_argument("--out", help="folder for the report files (default: the deepest folder "
                   "holding every RUN_DIR)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..report import build_report, default_out, write_report

    report = build_report(args.runs, args.baseline)
    write_report(report, Path(args.out) if args.out else default_out(args.runs))
    print(report["markdown"], end="")
