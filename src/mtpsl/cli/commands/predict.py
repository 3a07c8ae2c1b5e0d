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
                   help="image files, or folders searched for *.png, *.jpg, *.jpeg")
    p.add_argument("--out", required=True, help="folder for the predictions")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images (resize mode) or tiles (tile mode) per forward pass")
    p.add_argument("--mode", choices=["resize", "tile"], default="resize",
                   help="resize to the training size and back, or average overlapping tiles")
    add_data_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from mtpsl.inference.predict import predict_files

    written = predict_files(args.run, args.inputs, args.out, args.device, args.batch_size,
                            args.mode, args.root)
    print(f"wrote {len(written)} files to {args.out}")
