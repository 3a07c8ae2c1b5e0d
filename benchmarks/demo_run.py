"""Run the README demo (STL vs SL, one-label, synthetic) on a device and record the result.

    python benchmarks/demo_run.py --device cuda   # writes benchmarks/results/demo_cuda_<gpu>.json
    python benchmarks/demo_run.py --device cpu    # writes benchmarks/results/demo_cpu.json

The JSON holds the GPU name, torch version, the exact command, wall-clock time per run and the
comparison table, so the figure outlives the machine it was measured on.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from mtpsl.compare import compare
from mtpsl.config import load_config
from mtpsl.data.synthetic import write_nyuv2_layout

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mtpsl-demo", help="scratch folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for a CPU record)", file=sys.stderr)
        return 2
    work = Path(args.work)
    data = work / "data"
    if not (data / "synthetic.json").exists():
        write_nyuv2_layout(data, n_train=240, n_val=60, height=96, width=128, progress=False)
    overrides = [f"dataset.root={data}", f"train.device={args.device}", "train.progress=false"]
    config = load_config("synthetic_demo", overrides)
    started = time.perf_counter()
    table = compare(config, work / "runs")
    seconds = time.perf_counter() - started
    print(table)
    cuda = args.device == "cuda"
    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").rglob("final_metrics.json"))]
    record = {
        "benchmark": "demo",
        "command": f"python benchmarks/demo_run.py --device {args.device}",
        "config": "synthetic_demo + " + " ".join(overrides),
        "device": device_name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "wall_seconds": round(seconds, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "table_markdown": table,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"cuda_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}" if cuda else "cpu"
    path = out / f"demo_{tag}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
