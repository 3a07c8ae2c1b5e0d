"""The ``mtpsl`` command line: train, eval, presets (the other commands, ``compare`` and
``data`` included, live in :mod:`mtpsl.cli.commands`).

One error boundary (:func:`main`): every expected failure (an
:class:`~mtpsl.core.errors.MtpslError`, an OSError of any kind: a full disk, a denied
permission, a folder where a file belongs) is one line ``error: <what>`` with exit status 2,
never a traceback. A preempted run exits 75, Ctrl-C
130. Anything else is a bug in mtpsl: it keeps its traceback, marked as an internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from mtpsl import __version__
from mtpsl.cli.args import add_config_args, add_data_option
from mtpsl.cli.commands import add_all
from mtpsl.core.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    MtpslError,
    RunFolderError,
    strip_worker_traceback,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtpsl", description="Multi-task dense prediction from partially annotated images."
    )
    parser.add_argument("--version", action="version", version=f"mtpsl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run")
    add_config_args(p)
    p.add_argument("--run-dir", help="run folder (default: output_dir/name, made unique)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint")
    p.add_argument("--run", help="run folder (uses its checkpoint.pt)")
    p.add_argument("--checkpoint", help="checkpoint file (its config is stored inside)")
    p.add_argument("--split", help="dataset split to evaluate (default: the run's eval split)")
    add_data_option(p, "evaluate on another dataset folder of the same layout (the training "
                    "data need not exist; --root is an alias)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write the metrics JSON here")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON instead of a table")
    p.add_argument("--edge-measure", choices=("bsds", "dilation"),
                   help="score edge tasks with this measure (default: the run's)")
    p.add_argument("--edge-workers", type=int, metavar="N",
                   help="score edges (BSDS measure) in N processes (default: the run's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list shipped config presets or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_presets)
    add_all(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from mtpsl.core.config import load_config
    from mtpsl.core.names import preflight

    if args.resume:
        if args.config or args.run_dir:
            raise MtpslError("--resume takes the run's own config and folder: drop --config "
                             "and --run-dir (train.* overrides are allowed)")
        from mtpsl.engine.run import resume

        final = resume(args.resume, args.overrides)
    else:
        run_dir = Path(args.run_dir) if args.run_dir else None
        if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
            raise RunFolderError(f"run folder {run_dir} is a file")  # as claim_new says it
        config = load_config(args.config, args.overrides)  # before torch: typos fail fast,
        preflight(config)  # and so do unknown names and missing paths (under a second)
        from mtpsl.engine.run import train

        final = train(config, run_dir)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(json.dumps(final, indent=2))
        print(f"wrote {final['run_dir']}: {', '.join(run_outputs(Path(final['run_dir'])))}",
              file=sys.stderr)


RUN_OUTPUTS = ("final_metrics.json", "metrics.jsonl", "metrics.csv", "checkpoint.pt",
               "config.yaml", "split.json", "tensorboard/", "wandb/", "mlruns/")
"""What a run folder may hold, in the order ``train`` lists it (metrics.csv and the last
three: the logging backends of ``log.backends``)."""


def run_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (run_dir / name.rstrip("/")).exists()]


def cmd_eval(args: argparse.Namespace) -> None:
    from mtpsl.inference.evaluate import evaluate_checkpoint

    if bool(args.run) == bool(args.checkpoint):
        raise MtpslError("give exactly one of --run DIR or --checkpoint FILE")
    lock = None
    if args.out:
        from mtpsl.core.rundir import lock_if_run_folder

        lock = lock_if_run_folder(args.out)  # eval --out into a run folder: one writer
    try:
        metrics = evaluate_checkpoint(args.run, args.checkpoint, args.split, args.root,
                                      args.device, args.edge_measure, args.edge_workers)
        text = json.dumps(metrics, indent=2)
        if args.out:
            from mtpsl.core.files import write_text

            write_text(args.out, text + "\n")
    finally:
        if lock is not None:
            lock.release()
    print(text if args.json else metrics_table(metrics))
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def metrics_table(result: dict) -> str:
    """``mtpsl eval``'s result for a reader: where it came from, then one metric a line."""
    width = max((len(k) for k in result["metrics"]), default=6)
    lines = [f"{result['checkpoint']} (epoch {result['epoch']}) on the {result['split']} split "
             f"of {result['root']}", f"{'metric':<{width}}  value"]
    lines += [f"{key:<{width}}  {value:.6g}" for key, value in result["metrics"].items()]
    return "\n".join(lines)


def cmd_presets(args: argparse.Namespace) -> None:
    from importlib import resources

    from mtpsl.core.config import preset_names

    if args.name:
        if args.name not in preset_names():
            raise MtpslError(f"unknown preset {args.name!r}; presets: {preset_names()}")
        print((resources.files("mtpsl.presets") / f"{args.name}.yaml").read_text())
    else:
        print("\n".join(preset_names()))


def describe_os_error(err: OSError) -> str:
    """``<file>: <reason>`` for an OSError (a DataLoader worker's one without its traceback)."""
    reason = err.strerror or strip_worker_traceback(str(err))
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides accepted anywhere in it (argparse alone
    takes them only in one run, e.g. not after ``--run-dir DIR``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
        return args
    return parser.parse_args(argv)  # argparse's own error for anything else


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        args.func(args)
    except MtpslError as err:
        print(f"error: {strip_worker_traceback(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyError as err:  # registry lookups outside a config (e.g. `data check --dataset`)
        print(f"error: {err.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print("internal error: the traceback above is a bug in mtpsl, not a problem with your "
              "input; please report it with the command you ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
