"""How close the XTC training step comes to the CPU's fp32 peak, and where it loses the rest.

For each setting (the demo's XTC run; the issue's quarter-width step at 96x128; the paper's
full-width SegNet at 96x128 and 288x384) it times the real training step
(``bench_train.train_step``: autocast, the weighting's backward, the optimisers, the method's
after-step hooks) on one fixed synthetic batch, eager and with ``torch.compile`` (inductor's
C++ backend), counts the step's FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` and
divides the achieved rate by two ceilings measured or derived in the same run:

* the theoretical fp32 peak, cores x clock x FMA lanes x FMA units x 2, where the cores are
  the physical cores of the threads used (SMT siblings share their FMA units), the clock is
  /proc/cpuinfo's "cpu MHz" and the FMA width comes from the CPU family and flags (a table:
  :func:`fma_flops_per_cycle`);
* a 2048x2048 fp32 matmul (oneDNN/MKL's best case on the same cores).

Each cell runs in a fresh process with a time limit (compiling on 2 cores takes minutes; a
cell that does not finish is recorded as such). ``--profile`` adds, for the eager step of
each setting, the self time of each kind of operator (``torch.profiler``), the mapping passes'
share (the XTC step against the SL step of the same model and batch) and the allocator's
(minor page faults per step, and the step again with glibc keeping freed memory instead of
unmapping it).

    python benchmarks/bench_cpu_peak.py                                # everything (~1 h)
    python benchmarks/bench_cpu_peak.py --settings demo --no-compile   # one setting, eager
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from mtpsl.engine.speed import probe_hardware, proc_cpuinfo

sys.path.insert(0, str(Path(__file__).parent))
import bench_train  # a sibling script (on the path when run as a script)
from quiet import measured, wait_quiet

RESULTS = Path(__file__).parent / "results"

SETTINGS = {
    "demo": {"width_mult": 0.25, "height": 48, "width": 64, "batch_size": 8,
             "about": "the demo's XTC run (synthetic_demo: quarter width, 48x64, batch 8)"},
    "quarter_96x128": {"width_mult": 0.25, "height": 96, "width": 128, "batch_size": 2,
                       "about": "issue 27's measurement: quarter width, 96x128, batch 2"},
    "full_96x128": {"width_mult": 1.0, "height": 96, "width": 128, "batch_size": 2,
                    "about": "the paper's full-width SegNet at 96x128, batch 2"},
    "full_288x384": {"width_mult": 1.0, "height": 288, "width": 384, "batch_size": 2,
                     "about": "the paper's full-width SegNet at NYUv2's 288x384, batch 2"},
}
STEPS = {"demo": 20, "quarter_96x128": 20, "full_96x128": 8, "full_288x384": 3}
"""Timed steps per cell (about 10-30 s of stepping each on 2 cores)."""
MAX_OTHERS = 0.15
"""A step during which other processes took more CPU than this (cores) is not counted."""
DEMO_STEPS_PER_RUN = 120
"""Optimiser steps of one demo run (160 images / batch 8 x 6 epochs): what compile time is
spread over when deciding whether compile pays off end to end."""
KEEP_MEMORY = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:"
                                 "glibc.malloc.trim_threshold=68719476736"}
"""glibc's allocator told to serve blocks up to 32 MiB (its maximum) from the heap and never
give freed memory back: a freed activation's pages are reused instead of unmapped and
faulted in (and zeroed by the kernel) again on the next step."""


# -- the machine --------------------------------------------------------------------------------

def physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among logical ``cpus`` (SMT siblings share FMA units)."""
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return len(cores)


def fma_flops_per_cycle(info: dict[str, str]) -> tuple[int, str]:
    """fp32 FLOPs per cycle per core (FMA units x fp32 lanes x 2) and how it was derived.

    From the vendor's documented core designs, keyed by /proc/cpuinfo's vendor, family and
    flags: AMD Zen 1 two 128-bit FMA pipes; Zen 2/3 two 256-bit; Zen 4 AVX-512 on the same two
    256-bit pipes (double-pumped); Zen 5 two 512-bit. Intel with AVX-512: two 512-bit FMA
    units on Xeon Scalable Gold/Platinum and later (some Silver/Bronze parts have one); AVX2
    with FMA: two 256-bit units.
    """
    flags = set(info.get("flags", "").split())
    vendor, family = info.get("vendor_id", ""), int(info.get("cpu family", "0") or 0)
    model = int(info.get("model", "0") or 0)
    if vendor == "AuthenticAMD":
        if family >= 0x1A:
            return 64, "AMD Zen 5 (family 0x1A): 2 FMA pipes x 16 fp32 lanes (512-bit) x 2"
        if family == 0x19:
            zen = "Zen 4 (AVX-512 on 256-bit pipes)" if "avx512f" in flags else "Zen 3"
            return 32, f"AMD {zen} (family 0x19): 2 FMA pipes x 8 fp32 lanes (256-bit) x 2"
        if family == 0x17:
            if model >= 0x30:
                return 32, "AMD Zen 2 (family 0x17): 2 FMA pipes x 8 fp32 lanes x 2"
            return 16, "AMD Zen 1 (family 0x17): 2 FMA pipes x 4 fp32 lanes (128-bit) x 2"
    if "avx512f" in flags:
        return 64, "AVX-512: assumed 2 FMA units x 16 fp32 lanes x 2 (1 unit on some parts)"
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2 + FMA: 2 FMA units x 8 fp32 lanes x 2"
    return 8, "SSE: assumed 1 multiply + 1 add x 4 fp32 lanes"


def machine(threads: int) -> dict:
    """The CPU and the theoretical fp32 peak of the cores ``threads`` run on."""
    info = proc_cpuinfo()
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(threads))
    cores = min(threads, physical_cores(set(cpus)))
    mhz = float(info.get("cpu MHz", "0") or 0)
    per_cycle, how = fma_flops_per_cycle(info)
    return {
        "cpu": info.get("model name", platform.processor()),
        "vendor": info.get("vendor_id"), "family": info.get("cpu family"),
        "model": info.get("model"), "flags": info.get("flags", "").split(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": probe_hardware(torch.device("cpu")).native_bf16,
        "logical_cpus": len(cpus), "physical_cores_used": cores, "threads": threads,
        "cpu_mhz": mhz, "fp32_flops_per_cycle_per_core": per_cycle, "fma_derivation": how,
        "theoretical_fp32_gflops": cores * mhz / 1e3 * per_cycle,
        "peak_derivation": f"{cores} cores x {mhz / 1e3:.3f} GHz (/proc/cpuinfo cpu MHz) x "
                           f"{per_cycle} FLOP/cycle ({how})",
    }


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best rate of an ``n`` x ``n`` fp32 matmul on the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- one cell, in its own process ---------------------------------------------------------------

def run_cell(setting: str, method: str, compile_: bool, amp: str, profile: bool) -> dict:
    """Time (and count, and optionally profile) one training step setting in this process."""
    spec = SETTINGS[setting]
    args = argparse.Namespace(
        preset=None, method=method, width_mult=spec["width_mult"], batch_size=spec["batch_size"],
        height=spec["height"], width=spec["width"], regime="onelabel", amp=amp,
        channels_last=True, compile=compile_, device="cpu")
    config = bench_train.build_config(args, None)
    tasks = bench_train.nyuv2_tasks()
    started = time.perf_counter()
    step = bench_train.build_run(config, tasks, torch.device("cpu"))
    batch = bench_train.batch_for(tasks, step.exp.method.n_views, args, "onelabel")
    batch = bench_train.to_channels_last(batch, True)
    step.exp.model.train()
    step.exp.method.train()
    _, first, first_foreign = measured(lambda: bench_train.train_step(step, batch))  # compiles
    out: dict = {"first_step_s": first, "first_step_others_cores": first_foreign,
                 "setup_s": time.perf_counter() - started - first}
    for _ in range(2):
        bench_train.train_step(step, batch)
    if not compile_:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            bench_train.train_step(step, batch)
        out["flops_per_step"] = counter.get_total_flops()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps = [measured(lambda: bench_train.train_step(step, batch))[1:]
             for _ in range(STEPS[setting])]
    out["minor_faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                    - faults) / len(steps)
    quiet = sorted(wall for wall, others in steps if others <= MAX_OTHERS)
    out["undisturbed_steps"] = len(quiet)
    out["disturbed"] = len(quiet) < 3
    times = quiet if not out["disturbed"] else sorted(wall for wall, _ in steps)
    out["s_per_step"] = times[len(times) // 2]  # the median of the undisturbed steps
    out["s_per_step_min"] = times[0]
    out["threads"] = torch.get_num_threads()
    if profile:
        out["profile"] = profile_step(step, batch)
    return out


CATEGORIES = [  # first match wins; operator names as the profiler reports them
    ("convolution", ("convolution", "conv2d", "mkldnn_conv")),
    ("max-pool with indices", ("max_pool2d",)),
    ("unpooling", ("max_unpool", "gather", "scatter")),
    ("BatchNorm / norms", ("batch_norm", "group_norm", "layer_norm", "instance_norm", "var_mean",
                           "native_norm")),
    ("copies and layout", ("copy_", "clone", "contiguous", "_to_copy", "cat", "stack",
                           "permute", "as_strided")),
    ("allocation and fill", ("empty", "zero", "fill_", "resize_", "full")),
    ("matmul / linear", ("mm", "addmm", "linear", "matmul", "bmm")),
    ("optimiser", ("_foreach", "adam", "lerp", "sqrt", "addcdiv", "addcmul")),
]


def profile_step(step, batch, steps: int = 3) -> dict:
    """Self CPU time per kind of operator over ``steps`` steps (seconds per step, share)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(_timed(lambda: bench_train.train_step(step, batch)) for _ in range(steps))
    kinds: dict[str, float] = defaultdict(float)
    top: list[tuple[str, float]] = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        name = event.key.lower()
        kind = next((k for k, pats in CATEGORIES if any(p in name for p in pats)),
                    "elementwise and other ops")
        kinds[kind] += seconds
        top.append((event.key, seconds))
    in_ops = sum(kinds.values())
    kinds["outside operators (Python, autograd, dispatch)"] = max(0.0, wall / steps - in_ops)
    per_step = wall / steps
    top.sort(key=lambda kv: -kv[1])
    return {
        "s_per_step_profiled": per_step,
        "by_kind": {k: {"s": round(v, 5), "share": round(v / per_step, 4)}
                    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": k, "s": round(v, 5), "share": round(v / per_step, 4)}
                    for k, v in top[:15]],
    }


# -- the parent: every cell in a fresh process with a time limit -------------------------------

def child(setting: str, method: str, compile_: bool, amp: str, profile: bool, timeout: float,
          env: dict | None = None, tries: int = 4) -> dict:
    """One cell in a fresh process, started on a quiet machine and redone (up to ``tries``
    times) when other processes disturbed most of its timed steps."""
    cmd = [sys.executable, __file__, "--child", setting, "--method", method, "--amp", amp]
    cmd += ["--compile"] if compile_ else []
    cmd += ["--profile"] if profile else []
    for attempt in range(tries):
        wait_quiet(0.3)
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {"status": f"did not finish in {timeout:.0f} s", "wall_s": timeout}
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return {"status": f"failed (exit {done.returncode}): {done.stderr.strip()[-400:]}",
                    "wall_s": wall}
        cell = {"status": "ok", "wall_s": wall, "attempts": attempt + 1,
                **json.loads(done.stdout.strip().splitlines()[-1])}
        if not cell["disturbed"]:
            break
        print(f"  ({setting} {method}: disturbed by other processes; again)", flush=True)
    return cell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--no-profile", action="store_true", help="skip the profiles")
    p.add_argument("--amp", choices=["off", "bf16"], default="off",
                   help="the step's precision (the ceilings are fp32's)")
    p.add_argument("--compile-timeout", type=float, default=1800.0,
                   help="seconds a compiled cell may take, compile included")
    p.add_argument("--out", default=str(RESULTS / "cpu_peak.json"))
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--method", default="xtc", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_cell(args.child, args.method, args.compile, args.amp,
                                  args.profile)))
        return 0

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    threads = torch.get_num_threads()
    cpu = machine(threads)
    wait_quiet(0.3)
    matmul = matmul_gflops()
    cpu["matmul_2048_fp32_gflops"] = matmul
    cpu["clock_implied_by_matmul_ghz"] = matmul / cpu["physical_cores_used"] / cpu[
        "fp32_flops_per_cycle_per_core"]
    print(f"{cpu['cpu']}: {cpu['peak_derivation']} = {cpu['theoretical_fp32_gflops']:.0f} "
          f"GFLOP/s; 2048^2 fp32 matmul {matmul:.0f} GFLOP/s", flush=True)
    cells: dict[str, dict] = {}
    for setting in args.settings:
        row: dict = {"about": SETTINGS[setting]["about"]}
        eager = child(setting, "xtc", False, args.amp, not args.no_profile, 1800.0)
        row["eager"] = eager
        flops = eager.get("flops_per_step")
        if not args.no_profile and eager.get("status") == "ok":
            sl = child(setting, "sl", False, args.amp, False, 1800.0)
            row["sl_eager"] = sl
            if sl.get("status") == "ok":
                row["mapping_share"] = 1 - sl["s_per_step"] / eager["s_per_step"]
            kept = child(setting, "xtc", False, args.amp, False, 1800.0, KEEP_MEMORY)
            row["eager_keep_memory"] = kept
            if kept.get("status") == "ok":
                row["allocator_share"] = 1 - kept["s_per_step"] / eager["s_per_step"]
        if not args.no_compile:
            row["compiled"] = child(setting, "xtc", True, args.amp, False, args.compile_timeout,
                                    tries=2)
        for mode in ("eager", "compiled", "eager_keep_memory"):
            cell = row.get(mode)
            if cell and cell.get("status") == "ok" and flops:
                rate = flops / cell["s_per_step"] / 1e9
                cell["gflops"] = rate
                cell["fraction_of_theoretical_peak"] = rate / cpu["theoretical_fp32_gflops"]
                cell["fraction_of_matmul"] = rate / matmul
        if setting == "demo" and row.get("compiled", {}).get("status") == "ok":
            e, c = row["eager"], row["compiled"]
            eager_run = e["first_step_s"] + (DEMO_STEPS_PER_RUN - 1) * e["s_per_step"]
            compiled_run = c["first_step_s"] + (DEMO_STEPS_PER_RUN - 1) * c["s_per_step"]
            row["demo_run_estimate_s"] = {"eager": eager_run, "compiled": compiled_run,
                                          "compile_pays_off": compiled_run < eager_run}
        cells[setting] = row
        print(summary_line(setting, row), flush=True)
    record = {
        "benchmark": "bench_cpu_peak",
        "command": "python " + shlex.join(["benchmarks/bench_cpu_peak.py",
                                           *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"), "amp": args.amp,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "wall_s": time.perf_counter() - started,
        "machine": cpu, "cells": cells,
        "table": table(cells),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(record["table"])
    print(f"wrote {out}")
    return 0


def summary_line(setting: str, row: dict) -> str:
    parts = [setting]
    for mode in ("eager", "compiled"):
        cell = row.get(mode)
        if not cell:
            continue
        if cell.get("status") != "ok":
            parts.append(f"{mode}: {cell['status']}")
        elif "gflops" in cell:
            parts.append(f"{mode} {cell['s_per_step'] * 1e3:.0f} ms/step {cell['gflops']:.0f} "
                         f"GFLOP/s ({cell['fraction_of_theoretical_peak']:.0%} of peak, "
                         f"{cell['fraction_of_matmul']:.0%} of matmul)")
    return "  ".join(parts)


def table(cells: dict) -> str:
    """The README's table: one row per setting and mode."""
    lines = ["| setting | mode | ms / step | GFLOP / step | GFLOP/s | of peak | of matmul |"
             " first step (s) |", "|---|---|---|---|---|---|---|---|"]
    for setting, row in cells.items():
        flops = row.get("eager", {}).get("flops_per_step")
        for mode in ("eager", "compiled"):
            cell = row.get(mode)
            if not cell:
                continue
            if cell.get("status") != "ok":
                lines.append(f"| {setting} | {mode} | {cell['status']} | | | | | |")
                continue
            lines.append(
                f"| {setting} | {mode} | {cell['s_per_step'] * 1e3:.0f} | "
                f"{(flops or 0) / 1e9:.1f} | {cell.get('gflops', 0):.0f} | "
                f"{cell.get('fraction_of_theoretical_peak', 0):.0%} | "
                f"{cell.get('fraction_of_matmul', 0):.0%} | {cell['first_step_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
