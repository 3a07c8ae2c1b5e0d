"""``mtpsl figures NAME``: one sub-command per entry of :data:`mtpsl.analysis.figures.FIGURES`."""

from __future__ import annotations

import argparse

from mtpsl.cli.args import add_data_option


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from mtpsl.analysis.figures import FIGURES  # light: matplotlib is imported when drawing

    parser = subparsers.add_parser("figures", help="figures of finished runs (PNG + PDF)")
    sub = parser.add_subparsers(dest="figure", required=True)
    for name, spec in FIGURES.items():
        # argparse %-formats help strings ("95% interval" would break --help)
        p = sub.add_parser(name, help=spec.help.replace("%", "%%"), description=spec.help)
        p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR")
        p.add_argument("--labels", nargs="+", help="one per run (default: method names)")
        p.add_argument("--out", default="figures", help="output folder (default: figures)")
        if spec.uses_images:
            p.add_argument("--indices", nargs="+", type=int, required=True,
                           help="evaluation images to show, one row each")
            p.add_argument("--split", help="dataset split (default: the run's eval split)")
            add_data_option(p, "another dataset folder of the same layout (--root is an "
                            "alias)")
            p.add_argument("--device", default="auto")
        own = set()
        if spec.add_arguments is not None:
            before = {a.dest for a in p._actions}
            spec.add_arguments(p)
            own = {a.dest for a in p._actions} - before
        p.set_defaults(func=run, figure_options=sorted(own))


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtpsl.analysis.figures import FIGURES, FigureRequest

    request = FigureRequest(
        runs=[Path(r) for r in args.runs], out=Path(args.out), labels=args.labels,
        indices=getattr(args, "indices", None) or [], split=getattr(args, "split", None),
        root=getattr(args, "root", None), device=getattr(args, "device", "auto"),
        options={k: getattr(args, k) for k in args.figure_options})
    for path in FIGURES[args.figure].make(request):
        print(f"wrote {path}")
