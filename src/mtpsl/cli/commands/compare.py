"""``mtpsl compare``: a grid of methods x label regimes x seeds, trained here (one cell after
another, or ``--jobs N`` at once) or submitted as cluster jobs (``--launcher submitit``); the
tables when the last cell ends; ``--status OUT`` lists the cells' states."""

from __future__ import annotations

import argparse

from mtpsl.cli.args import add_config_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare", help="train a grid of methods x regimes x seeds; print a table",
        description="Train every cell (regime x method x seed) of the config's compare section "
        "missing in OUT, each an ordinary run folder OUT/<regime>/<method>/seed<k>, and write "
        "OUT/results.md, results.csv, curves.png and seeds.png when the last cell ends. Cells "
        "train in this process, N at once on this machine (--jobs N) or as cluster jobs "
        "(--launcher submitit, with compare.launcher.*: partition, time_min, gpus_per_cell, "
        "cpus_per_cell, mem_gb...). Running it again launches only the cells that are "
        "neither done nor queued or running (failed and stopped ones continue from their "
        "checkpoints).")
    add_config_args(p)
    p.add_argument("--out", help="folder for the grid's runs and tables")
    p.add_argument("--methods", help="comma list, overrides compare.methods")
    p.add_argument("--regimes", help="comma list, overrides compare.regimes")
    p.add_argument("--seeds", help="comma list, overrides compare.seeds")
    p.add_argument("--launcher", choices=("local", "submitit"),
                   help="where cells train (compare.launcher.name): local = this machine; "
                   "submitit = one cluster job per cell (SLURM, or submitit's local executor "
                   "with compare.launcher.cluster=local)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help="local: cells trained at once, each in its own process on its own "
                   "GPU (or its share of the CPU threads) (compare.launcher.jobs; default 1: "
                   "one after another in this process)")
    p.add_argument("--wait", action="store_true",
                   help="submitit: wait for the jobs and print the tables (default: submit "
                   "and return; the last job to end writes them)")
    p.add_argument("--status", metavar="OUT",
                   help="list the cells of the grid in OUT as pending, running, done or "
                   "failed, with job ids, hosts and log paths, then exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from mtpsl.core.errors import MtpslError

    if args.status:
        if args.out or args.config or args.overrides:
            raise MtpslError("--status OUT only reads the grid in OUT: drop --out, --config "
                             "and the overrides")
        from mtpsl.analysis.launch.state import status_text

        print(status_text(Path(args.status)))
        return
    if not args.out:
        raise MtpslError("compare needs --out OUT (the grid's folder), or --status OUT")
    from mtpsl.analysis.compare import compare
    from mtpsl.core.config import load_config

    overrides = list(args.overrides)
    for key in ("methods", "regimes", "seeds"):
        value = getattr(args, key)
        if value:
            overrides.append(f"compare.{key}=[{value}]")
    if args.launcher:
        overrides.append(f"compare.launcher.name={args.launcher}")
    if args.jobs is not None:
        overrides.append(f"compare.launcher.jobs={args.jobs}")
    print(compare(load_config(args.config, overrides), Path(args.out), args.wait))
