"""``mtpsl export``: a trained run as an ONNX or TorchScript file."""

from __future__ import annotations

import argparse

from mtpsl.cli.args import add_data_option
from mtpsl.core.errors import MtpslError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a run's model to ONNX or TorchScript",
        description="Write the run's model as a file that maps images [B,3,H,W] in [0,1] to "
                    "one activated prediction per task (task names recorded with it).")
    p.add_argument("--run", required=True, help="run folder (uses its checkpoint.pt)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", help="output file (default: RUN/model.onnx or "
                                 "RUN/model.torchscript.pt)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset (below 18: TorchScript-based exporter; 18+: torch.export)")
    add_data_option(p)
    p.set_defaults(func=run)


def check_opset(opset: int) -> None:
    """Refuse an opset newer than the installed ``onnx`` knows: the exporter converts to the
    asked opset with onnx's version converter and, above its range, silently keeps its own
    (18). Without onnx, the export itself says what to install."""
    try:
        import onnx
    except ImportError:
        return
    newest = int(onnx.defs.onnx_opset_version())
    if opset > newest:
        raise MtpslError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} "
                         f"supports: at most {newest}")


def run(args: argparse.Namespace) -> None:
    from mtpsl.inference.export import export_run

    if args.format == "onnx":
        check_opset(args.opset)
    path = export_run(args.run, args.format, args.out, args.opset, args.root)
    print(f"wrote {path} (+ {path.name}.json)")
