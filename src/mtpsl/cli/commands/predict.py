"""``mtpsl predict``: a trained run on ordinary image files of any size."""

from __future__ import annotations

import argparse

from mtpsl.cli.args import add_data_option


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="predict every task for PNG/JPEG images (files or folders)",
        description="Run a trained model on image files of any size and write colourised "
                    "PNGs plus raw arrays per task into --out.")
    p.add_argument("--run", required=True, help="run folder (uses its checkpoint.pt)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched (not recursively) for *.png, *.jpg, "
                   "*.jpeg, leaving out files that look like labels or outputs of an image "
                   "beside them (<stem>_*.png next to <stem>.jpg) and *_index/_16bit/_panel.png")
    p.add_argument("--glob", action="append", metavar="PATTERN",
                   help="which files of a folder are images, e.g. '*_rgb.png' (repeatable; "
                   "case-insensitive); then nothing matching is left out")
    p.add_argument("--panel", action="store_true",
                   help="also write <stem>_panel.png: the input beside every task's "
                   "prediction, with class names, a depth scale in metres and the normals' "
                   "colour key")
    p.add_argument("--out", required=True, help="folder for the predictions")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images (resize mode) or tiles (tile mode) per forward pass")
    p.add_argument("--mode", choices=["resize", "tile"], default="resize",
                   help="resize to the training size and back, or average overlapping tiles")
    p.add_argument("--max-megapixels", type=float, default=40.0, metavar="MP",
                   help="refuse images above this size, read from their headers before "
                   "anything is decoded (outputs are full-size: ~150 bytes of memory a pixel "
                   "for three tasks); default 40")
    add_data_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    from mtpsl.inference.predict import predict_files

    skipped: list[Path] = []
    written = predict_files(args.run, args.inputs, args.out, args.device, args.batch_size,
                            args.mode, args.root, panel=args.panel, globs=args.glob,
                            skipped=skipped, max_megapixels=args.max_megapixels)
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"note: left out {len(skipped)} files that look like labels or outputs of the "
              f"images beside them ({names}); --glob names the images instead",
              file=sys.stderr)
    print(f"wrote {len(written)} files to {args.out}")
    panels = [p for p in written if p.name.endswith("_panel.png")]
    for path in panels:
        print(f"wrote {path}")
