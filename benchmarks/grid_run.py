"""Render a synthetic dataset, run a preset's comparison grid on one device, record it.

    python benchmarks/grid_run.py --device cpu                     # the README demo grid
    python benchmarks/grid_run.py --device cuda                    # the same on a GPU
    python benchmarks/grid_run.py --device cuda --preset synthetic_benchmark \
        --n-train 795 --n-val 654 --height 144 --width 192         # the method issue's table
    python benchmarks/grid_run.py --device cuda --preset synthetic_semimtl \
        --height 64 --width 128                # SemiMTL on the synthetic cross-domain pair

Cross-dataset presets print one more table per source (``mtpsl compare``'s own tables, with
Delta_m over the preset's ``compare.delta_metrics``). Writes
``benchmarks/results/<preset>_<device>.json`` (device name, torch version, the exact command,
wall time, peak GPU memory, the table and every run's final metrics) and the Markdown table
beside it, so the figures outlive the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

from mtpsl.analysis.compare import compare
from mtpsl.core.config import load_config
from mtpsl.data.cross_domain import write_synthetic_pair
from mtpsl.data.synthetic import write_cityscapes_layout, write_nyuv2_layout, write_pascal_layout
from mtpsl.engine.speed import probe_hardware

sys.path.insert(0, str(Path(__file__).parent))
from quiet import measured, wait_quiet  # a sibling script (on the path when run as a script)

ROOT = Path(__file__).resolve().parents[1]


SYNTHETIC_WRITERS = {
    "nyuv2": write_nyuv2_layout,
    "cityscapes": write_cityscapes_layout,
    "pascal_context": write_pascal_layout,
}
"""Which built-in renderer stands in for a preset's dataset."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="synthetic_demo")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    # Defaults: the demo's data, as `make demo` renders it.
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-val", type=int, default=50)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--work", default="/tmp/mtpsl-grid", help="scratch folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--suffix", default="", help="appended to the record's name, e.g. _fp32")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for a CPU record)", file=sys.stderr)
        return 2
    work = Path(args.work) / f"{args.preset}-{args.height}x{args.width}"
    data = work / "data"
    overrides = [f"dataset.root={data}", f"train.device={args.device}", "train.progress=false",
                 *args.overrides]
    config = load_config(args.preset, overrides)
    if config.dataset.name == "cross_domain":  # the synthetic pair: data/domain_{a,b}
        if not (data / "domain_b" / "synthetic.json").exists():
            write_synthetic_pair(data, layout=config.dataset.options["domains"][0]["name"],
                                 n_train=args.n_train, n_val=args.n_val, height=args.height,
                                 width=args.width, progress=False)
    elif not (data / "synthetic.json").exists():
        writer = SYNTHETIC_WRITERS.get(config.dataset.name)
        if writer is None:
            print(f"error: no synthetic data for dataset {config.dataset.name!r}; known: "
                  f"{', '.join(SYNTHETIC_WRITERS)}", file=sys.stderr)
            return 2
        writer(data, n_train=args.n_train, n_val=args.n_val, height=args.height,
               width=args.width, progress=False)
    runs_dir = work / f"runs-{args.device}{args.suffix}"  # finished cells are kept
    if args.device == "cpu":
        wait_quiet(0.3)  # timings on a shared machine: see quiet.py
    table, seconds, others = measured(lambda: compare(config, runs_dir))
    print(table)
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name(0) if cuda else _cpu_name()
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.rglob("final_metrics.json"))]
    record = {
        "benchmark": args.preset,
        "command": "python benchmarks/grid_run.py " + " ".join(sys.argv[1:]),
        "data": {"n_train": args.n_train, "n_val": args.n_val,
                 "size": [args.height, args.width]},
        "overrides": overrides,
        "device": device_name,
        "cpu_class": None if cuda else cpu_class(runs),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "wall_seconds": round(seconds, 1),
        "others_cpu_cores": round(others, 3),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "table_markdown": table,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"cuda_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}" if cuda else "cpu"
    path = out / f"{args.preset}_{tag}{args.suffix}.json"
    path.write_text(json.dumps(record, indent=2))
    path.with_suffix(".md").write_text(f"`{record['command']}` on {device_name}\n\n{table}\n")
    print(f"wrote {path}")
    return 0


def cpu_class(runs: list[dict]) -> dict:
    """Which class of CPU wrote the record: its vector capability and whether it has bf16
    natively, which decide what ``train.amp: auto`` trained in (the runs' precision)."""
    hw = probe_hardware(torch.device("cpu"))
    return {"isa": hw.isa, "native_bf16": hw.native_bf16,
            "amp": sorted({r["setup"]["train"]["amp"] for r in runs})}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


if __name__ == "__main__":
    sys.exit(main())
