"""Write the README's demo table and the docs' weighting-cost tables from the committed
records, or check that they match.

    python benchmarks/readme_table.py           # rewrite the blocks in README.md and the docs
    python benchmarks/readme_table.py --check   # exit 1 if a page differs from its record

The block between ``<!-- demo-table -->`` and ``<!-- /demo-table -->`` is the table that
``mtpsl compare`` prints for the runs in ``benchmarks/results/synthetic_demo_cpu.json``
(rendered by the same code, :func:`mtpsl.analysis.report.tables_markdown`), followed by the measured
training time. The record is written by ``python benchmarks/grid_run.py --device cpu``. In
``docs/concepts/weightings.md`` (:data:`WEIGHTINGS_PAGE`), the
block between ``<!-- weightings-table -->`` and ``<!-- /weightings-table -->`` is the table of
``benchmarks/results/weightings_cpu.json`` (``python benchmarks/bench_weightings.py``), the one
between ``<!-- weightings-full-width-table -->`` and its end that of
``weightings_cpu_full_width.json`` (the full-width SegNet, where the K task gradients weigh).
The README's block between ``<!-- pascal-twin-table -->`` and its end is the comparison of the
PASCAL partial-label twin (:data:`TWIN_RECORD`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mtpsl.analysis import report
from mtpsl.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "synthetic_demo_cpu.json"
FP32_RECORD = ROOT / "benchmarks" / "results" / "synthetic_demo_cpu_fp32.json"
"""The same grid in fp32 (``grid_run.py --device cpu --suffix _fp32 train.amp=off``): what
``auto`` trains in on a CPU without native bf16."""
EPOCH_RECORD = ROOT / "benchmarks" / "results" / "demo_epoch_cpu.json"
"""One demo epoch here and on issue 27's CPU (``bench_demo_epoch.py``): the scale between them."""
README = ROOT / "README.md"
WEIGHTINGS_PAGE = ROOT / "docs" / "concepts" / "weightings.md"
"""The docs page that holds the weighting tables."""
BEGIN, END = "<!-- demo-table -->", "<!-- /demo-table -->"
WEIGHTINGS_TABLES = {name: (ROOT / "benchmarks" / "results" / f"{name}.json",
                             f"<!-- {tag}-table -->", f"<!-- /{tag}-table -->")
                     for name, tag in (("weightings_cpu", "weightings"),
                                       ("weightings_cpu_full_width", "weightings-full-width"))}
"""The weighting benchmark's records and the markers of their tables in
:data:`WEIGHTINGS_PAGE`."""


TWIN_RECORD = ROOT / "benchmarks" / "results" / "synthetic_partial_pascal_onelabel_cpu.json"
"""The PASCAL partial-label twin's comparison (``grid_run.py --device cpu --preset
synthetic_partial_pascal_onelabel``): issue 31's six methods, three seeds."""
TWIN_BEGIN, TWIN_END = "<!-- pascal-twin-table -->", "<!-- /pascal-twin-table -->"


def twin_block(record: dict) -> str:
    """The README block of the PASCAL twin: the tables ``mtpsl compare`` printed and what the
    grid cost."""
    text = compare_tables(record)
    minutes, per_method = training_minutes(record)
    timing = (f"Measured: {minutes:.1f} min of training ({len(record['runs'])} runs; per run "
              f"{per_method}), {record['wall_seconds'] / 60:.1f} min wall time with evaluation, "
              f"on {record['device']}{cpu_class(record)} with {record['cpu_threads']} threads, "
              f"torch {record['torch']} (`{record['command']}`).")
    return f"{TWIN_BEGIN}\n{text}\n\n{timing}\n{TWIN_END}"


SPEED_PAGE = ROOT / "docs" / "how-to" / "speed.md"
"""The docs page that holds the CPU peak benchmark's block."""
PEAK_RECORDS = [ROOT / "benchmarks" / "results" / name
                for name in ("cpu_peak.json", "cpu_peak_288x384.json")]
"""``bench_cpu_peak.py``'s records (the 288x384 setting ran alone, without profiles)."""
PEAK_BEGIN, PEAK_END = "<!-- cpu-peak-table -->", "<!-- /cpu-peak-table -->"


def peak_block(records: list[dict]) -> str:
    """The speed page's block: every setting's row, the ceilings and where the step loses."""
    body = [line for r in records for line in r["table"].splitlines()[2:]]
    table = "\n".join(records[0]["table"].splitlines()[:2] + body)
    commands = ", ".join("`" + r["command"] + "`" for r in records)
    matmuls = " and ".join(f"{r['machine']['matmul_2048_fp32_gflops']:.0f}" for r in records)
    clock = max(r["machine"]["clock_implied_by_matmul_ghz"] for r in records)
    cpu = records[0]["machine"]
    lines = [f"Measured on {cpu['cpu']} ({cpu['cpu_capability']}), {cpu['threads']} threads, "
             f"torch {records[0]['torch']}, fp32 XTC training steps; the theoretical peak is "
             f"{cpu['peak_derivation']} = {cpu['theoretical_fp32_gflops']:.0f} GFLOP/s; a "
             f"2048x2048 fp32 matmul reached {matmuls} GFLOP/s in the same runs (the clock "
             f"that implies, up to {clock:.2f} GHz, is above /proc/cpuinfo's: boost, so the "
             f"matmul is the tighter ceiling); FLOPs from `FlopCounterMode` "
             f"({commands})."]
    for record in records:
        for setting, row in record["cells"].items():
            lines += _where_it_goes(setting, row)
    return f"{PEAK_BEGIN}\n{table}\n\n" + "\n".join(lines) + f"\n{PEAK_END}"


def _where_it_goes(setting: str, row: dict) -> list[str]:
    """One line per profiled setting: its largest kinds of operators and the mapping's and the
    allocator's shares; the compile verdict at the demo size."""
    out = []
    profile = row.get("eager", {}).get("profile")
    if profile:
        kinds = ", ".join(f"{kind} {v['share']:.0%}"
                          for kind, v in list(profile["by_kind"].items())[:5])
        shares = []
        if "mapping_share" in row:
            shares.append(f"XTC's mapping passes {row['mapping_share']:.0%} of the step (against "
                          f"SL's step on the same model)")
        if "allocator_share" in row:
            shares.append(f"page faults of freed memory {max(row['allocator_share'], 0):.0%}")
        out.append(f"- {setting}: {kinds}; {'; '.join(shares)}.")
    verdict = row.get("demo_run_estimate_s")
    if verdict:
        pays = "it pays off" if verdict["compile_pays_off"] else "eager stays the default"
        out.append(f"- compile at the demo's size: a run would take {verdict['compiled']:.0f} s "
                   f"compiled against {verdict['eager']:.0f} s eager (compile time included): "
                   f"{pays}.")
    return out


def demo_config(record: dict):
    """The demo preset with the record's overrides (its data folder, device)."""
    return load_config(record["benchmark"], record["overrides"])


def compare_tables(record: dict) -> str:
    """The tables ``mtpsl compare`` prints for a record's runs (the same code renders them)."""
    config = demo_config(record)
    results = [report.result_of(run, None, run["name"]) for run in record["runs"]]
    tables = report.build_tables(results, config.compare.baseline, config.compare.delta_metrics)
    return report.tables_markdown(tables, config.compare.baseline, config.compare.contrasts)


def block(record: dict) -> str:
    """The README block for ``record``: the printed tables and the time they took."""
    text = compare_tables(record)
    minutes, per_method = training_minutes(record)
    timing = (f"Measured: {minutes:.1f} min of training in all ({len(record['runs'])} runs; "
              f"per run {per_method}) and {record['wall_seconds'] / 60:.1f} min wall time with "
              f"evaluation, on {record['device']}{cpu_class(record)} with "
              f"{record['cpu_threads']} threads, torch {record['torch']}.")
    return f"{BEGIN}\n{text}\n\n{timing}\n{other_class()}{END}"


def training_minutes(record: dict) -> tuple[float, str]:
    """Total training minutes of a record's runs and the mean seconds per run of each method."""
    seconds: dict[str, list[float]] = {}
    for run in record["runs"]:
        seconds.setdefault(run["label"], []).append(run["train_seconds_this_session"])
    per_method = ", ".join(f"{m} {statistics.mean(s):.0f} s" for m, s in seconds.items())
    return sum(sum(s) for s in seconds.values()) / 60, per_method


def other_class() -> str:
    """The paragraph on CPUs without native bf16: the fp32 grid measured here, its verdicts,
    and the estimate for issue 27's CPU ('' until both records exist)."""
    if not (FP32_RECORD.exists() and EPOCH_RECORD.exists()):
        return ""
    fp32, epoch = json.loads(FP32_RECORD.read_text()), json.loads(EPOCH_RECORD.read_text())
    minutes, per_method = training_minutes(fp32)
    text = compare_tables(fp32)
    verdicts = "; ".join(line.removeprefix("- ") for line in text.splitlines()
                         if line.startswith("- "))
    scale, ours = epoch["scale_to_reference"], epoch["cells"]["off/true"]
    ref = epoch["reference"]
    return (f"\nOn a CPU without native bf16 `train.amp: auto` trains in fp32. The same grid in "
            f"fp32, measured on the machine above: {minutes:.1f} min of training ({per_method});"
            f" its verdicts: {verdicts}. Estimated on {ref['cpu']}: at most {minutes * scale:.1f} "
            f"min of training, the fp32 time here x {scale:.2f}, the ratio of one SL epoch of "
            f"the demo preset at 64x96 in fp32, channels-last, there (its whole process, "
            f"{ref['seconds']['off/true']} s, {ref['source'].split(' (')[0]}, less the start-up "
            f"measured here) and here ({ours['epoch_s']:.1f} s after a "
            f"{ours['one_epoch_process_s'] - ours['epoch_s']:.1f} s start-up, "
            f"`{epoch['command']}`).\n")


def cpu_class(record: dict) -> str:
    """`` (AVX512, avx512_bf16: bf16 by train.amp=auto)``: the class of CPU that wrote the
    record, which decides the precision ``auto`` trained in ('' for older records)."""
    cls = record.get("cpu_class")
    if not cls:
        return ""
    amp = " and ".join("fp32" if a == "off" else a for a in cls["amp"])
    return f" ({cls['isa']}: {amp} by train.amp=auto)"


def weightings_block(record: dict, begin: str, end: str) -> str:
    """The docs block of the weighting benchmark: its table and what it was measured on."""
    setup = record["setup"]
    measured = (f"Measured on {record['device']}, torch {record['torch']}, {record['date']}: "
                f"{setup['method']} on {setup['tasks']} tasks, {setup['model']}, "
                f"{setup['height']}x{setup['width']}, batch {setup['batch_size']} "
                f"(`{record['command']}`).")
    return f"{begin}\n{record['table']}\n\n{measured}\n{end}"


def current_block(text: str, begin: str = BEGIN, end_mark: str = END) -> str:
    """The block between ``begin`` and ``end_mark`` (both included) of a page's ``text``."""
    start, end = text.find(begin), text.find(end_mark)
    if start < 0 or end < start:
        raise SystemExit(f"no {begin} ... {end_mark} block")
    return text[start:end + len(end_mark)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    pages = {page: page.read_text() for page in (README, WEIGHTINGS_PAGE, SPEED_PAGE)}
    blocks = [(README, RECORD, block(json.loads(RECORD.read_text())),
               current_block(pages[README]))]
    blocks += [(WEIGHTINGS_PAGE, path, weightings_block(json.loads(path.read_text()), begin, end),
                current_block(pages[WEIGHTINGS_PAGE], begin, end))
               for path, begin, end in WEIGHTINGS_TABLES.values()]
    if TWIN_RECORD.exists():
        blocks.append((README, TWIN_RECORD, twin_block(json.loads(TWIN_RECORD.read_text())),
                       current_block(pages[README], TWIN_BEGIN, TWIN_END)))
    peaks = [p for p in PEAK_RECORDS if p.exists()]
    if peaks:
        blocks.append((SPEED_PAGE, peaks[0], peak_block([json.loads(p.read_text())
                                                         for p in peaks]),
                       current_block(pages[SPEED_PAGE], PEAK_BEGIN, PEAK_END)))
    if args.check:
        stale = [f"{page.relative_to(ROOT)} ({path.name})"
                 for page, path, want, have in blocks if want != have]
        if stale:
            print(f"stale: {', '.join(stale)}: run python benchmarks/readme_table.py",
                  file=sys.stderr)
            return 1
        return 0
    for page, path, want, have in blocks:
        pages[page] = pages[page].replace(have, want)
        print(f"wrote the table of {path.name} into {page.relative_to(ROOT)}")
    for page, text in pages.items():
        if text != page.read_text():
            page.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
