"""``mtpsl data``: synth (the built-in dataset), check (validate a folder), prepare (the standard
layouts from the official downloads) and diff (two copies of one layout compared)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mtpsl.core.errors import MtpslError

MAX_SIDE = 2048
"""Largest synthetic image side (Cityscapes' full 1024 x 2048 fits): the renderer holds
float64 arrays per pixel, ~1 GB at 1024 x 1024, ~4 GB at 2048 x 2048."""


def _size(text: str) -> tuple[int, int]:
    from mtpsl.data.prepare.geometry import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _count(least: int, most: int | None = None):
    """An argparse type: an integer in ``[least, most]`` (a size of 0 or a negative count
    would render nothing, or default silently)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < least or (most is not None and value > most):
            span = f"at least {least}" if most is None else f"in [{least}, {most}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_cmd", required=True)
    p = data.add_parser("synth", help="render the built-in procedural dataset to disk")
    p.add_argument("--out", required=True)
    p.add_argument("--layout", choices=["nyuv2", "cityscapes", "pascal_context"],
                   default="nyuv2")
    p.add_argument("--n-train", type=_count(1), default=795)
    p.add_argument("--n-val", type=_count(1), default=654)
    p.add_argument("--height", type=_count(1, MAX_SIDE),
                   help="default 288 (nyuv2) / 128 (cityscapes) / 96 (pascal_context)")
    p.add_argument("--width", type=_count(1, MAX_SIDE),
                   help="default 384 (nyuv2) / 256 (cityscapes) / 128 (pascal_context)")
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--style", choices=["a", "b"], default="a", help="appearance domain")
    p.add_argument("--pair", action="store_true",
                   help="cross-domain pair: OUT/domain_a (style a) + OUT/domain_b (style b)")
    p.set_defaults(func=cmd_synth)

    p = data.add_parser("check", help="validate a dataset folder and print a summary")
    p.add_argument("--root", required=True)
    p.add_argument("--dataset", default="nyuv2")
    p.add_argument("--split", default="train")
    p.add_argument("--headers-only", action="store_true",
                   help="check names, shapes and dtypes only (fast), not the values of every "
                   "file (class ids, depth, NaN)")
    p.set_defaults(func=cmd_check)

    prep = data.add_parser(
        "prepare", help="build a standard layout from the official downloads (nothing is "
        "downloaded; resumable; writes prepare.json)").add_subparsers(dest="dataset",
                                                                       required=True)
    p = prep.add_parser("nyuv2", help="MTAN's 13-class 288x384 NYUv2 from the labelled .mat")
    p.add_argument("--mat", required=True, type=Path, help="nyu_depth_v2_labeled.mat (v7.3)")
    p.add_argument("--splits", required=True, type=Path, help="splits.mat (795/654)")
    p.add_argument("--normals", required=True, metavar="SOURCE",
                   help="Eigen's normals_gt folder or .tgz (what MTAN used), FAIR's "
                   "all_normals.pklz or its zip, or from-depth (computed, not MTAN's)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=_size, default=(288, 384), metavar="HxW")
    p.add_argument("--crop", default="44:471,40:601", metavar="T:B,L:R",
                   help="valid-border crop before resizing, 0-based, end exclusive, or none")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prepare)

    p = prep.add_parser("cityscapes", help="MTAN's Cityscapes layout from the packages")
    p.add_argument("--root", required=True, type=Path,
                   help="folder holding leftImg8bit/, gtFine/, disparity/ (camera/ for metric)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--size", type=_size, default=(128, 256), metavar="HxW",
                   help="128x256 (MTAN's cityscapes2) or 256x512")
    p.add_argument("--depth", choices=["mtan", "pixels", "metric"], default="mtan",
                   help="mtan: disparity PNG / 65535 (hypothesis, see README); pixels: "
                   "disparity at the output width; metric: metres from the camera JSON")
    p.add_argument("--label7", choices=["trainid", "category"], default="trainid",
                   help="7 categories of the 19 train ids (others void), or of every class")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prepare)

    p = prep.add_parser("pascal_context", help="check PASCAL_MT, write its parts lists")
    p.add_argument("--root", required=True, type=Path, help="the PASCAL_MT folder")
    p.add_argument("--area-thres", type=int, default=0,
                   help="the benchmark's area_thres (objects of no more pixels count as -1)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_prepare)

    p = data.add_parser("diff", help="compare two copies of one .npy layout dataset "
                        "(e.g. a prepared copy against the published release)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--split", action="append", help="split to compare (repeatable; "
                   "default: every split both hold)")
    p.add_argument("--match", action="store_true",
                   help="pair each B image with the most similar A image instead of by index")
    p.add_argument("--limit", type=int, metavar="N", help="compare the first N pairs only")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the full report here")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_diff)


def cmd_synth(args: argparse.Namespace) -> None:
    from mtpsl.data import synthetic

    writer = {"nyuv2": synthetic.write_nyuv2_layout,
              "cityscapes": synthetic.write_cityscapes_layout,
              "pascal_context": synthetic.write_pascal_layout}[args.layout]
    size = {"nyuv2": (288, 384), "cityscapes": (128, 256), "pascal_context": (96, 128)}[
        args.layout]
    if args.pair and args.layout == "pascal_context":
        raise MtpslError("--pair renders the nyuv2 and cityscapes layouts, not pascal_context")
    if args.pair:
        from mtpsl.data.cross_domain import write_synthetic_pair

        a, b = write_synthetic_pair(args.out, layout=args.layout, n_train=args.n_train,
                                    n_val=args.n_val, height=args.height or size[0],
                                    width=args.width or size[1], seed=args.seed)
        print(f"wrote {args.layout} cross-domain pair to {a} and {b}")
        return
    writer(args.out, n_train=args.n_train, n_val=args.n_val, height=args.height or size[0],
           width=args.width or size[1], seed=args.seed, style=args.style)
    print(f"wrote {args.layout} layout to {args.out}")


def cmd_check(args: argparse.Namespace) -> None:
    from mtpsl.data import DATASETS, RELEASE_SIZES

    ds = DATASETS.get(args.dataset)(args.root, args.split)
    print(ds)
    expected = RELEASE_SIZES.get(args.dataset, {}).get(args.split)
    if expected is not None and len(ds) != expected:
        print(f"  note: the standard {args.dataset} release has {expected} {args.split} images, "
              f"this folder {len(ds)}: an incomplete download or extraction, or a subset "
              "(fine if intended)")
    for task, n_missing in ds.missing_counts.items():
        line = f"  {task}: {len(ds) - n_missing} of {len(ds)} images labelled"
        if n_missing:
            line += (f", {n_missing} without a label file (read as partially annotated: "
                     "training never sees this task for them)")
        print(line)
    if args.headers_only:
        print("  values: not checked (--headers-only)")
        return
    # Decoding is what checks the values (class ids within the class count, depth finite
    # and >= 0, no NaN): the headers say nothing of them, and training would fail mid-epoch.
    for index in range(len(ds)):
        ds[index]
    print(f"  values: all {len(ds)} images decoded, every label within its task's range")


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_prepare(args: argparse.Namespace) -> None:
    from mtpsl.data.prepare.common import describe

    if args.dataset == "nyuv2":
        from mtpsl.data.prepare.geometry import parse_box
        from mtpsl.data.prepare.nyuv2 import prepare_nyuv2

        try:
            box = parse_box(args.crop)
        except ValueError as err:
            raise MtpslError(f"--crop: {err}") from None
        summary = prepare_nyuv2(args.mat, args.splits, args.normals, args.out, size=args.size,
                                crop=box, progress=args.progress, on_start=_say)
        root = args.out
    elif args.dataset == "cityscapes":
        from mtpsl.data.prepare.cityscapes import prepare_cityscapes

        summary = prepare_cityscapes(args.root, args.out, size=args.size, depth=args.depth,
                                     label7=args.label7, progress=args.progress, on_start=_say)
        root = args.out
    else:
        from mtpsl.data.prepare.pascal import prepare_pascal

        summary, counts = prepare_pascal(args.root, area_thres=args.area_thres,
                                         progress=args.progress, on_start=_say)
        root = args.root
        for split, row in counts.items():
            print(f"{split}: " + ", ".join(f"{task} {n}" for task, n in row.items()))
    what = "the parts lists (ImageSets/Parts)" if args.dataset == "pascal_context" else \
        f"the {args.dataset} layout"
    print(describe(summary, what))
    for note in summary.notes:
        print(note)
    print(f"next: mtpsl data check --root {root} --dataset {args.dataset} --split train")


def cmd_diff(args: argparse.Namespace) -> None:
    from mtpsl.data.prepare.common import progress_bar
    from mtpsl.data.prepare.diff import diff_layouts, format_report

    if args.limit is not None and args.limit < 1:
        raise MtpslError(f"--limit must be at least 1, got {args.limit}")

    def bar(total: int, split: str):
        return progress_bar(total, f"diff {split}", args.progress, unit="file")

    report = diff_layouts(args.a, args.b, splits=args.split, match=args.match,
                          limit=args.limit, progress=bar)
    print(format_report(report))
    if args.json:
        from mtpsl.core.files import write_text

        write_text(args.json, json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"wrote the full report to {args.json}", file=sys.stdout)
