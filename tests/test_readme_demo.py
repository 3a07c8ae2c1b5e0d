"""The README's demo table is what the demo prints: generated from the committed record by
``benchmarks/readme_table.py`` (as are the docs' weighting-cost tables), and the record is of
the demo as the preset and Makefile define it today (a changed preset, method list, seed list
or data size needs a new record)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mtpsl.analysis.compare import cell_config_for, grid_cells
from mtpsl.core.config import Config, load_config
from mtpsl.core.signature import flatten, setup_from_config
from mtpsl.engine import speed

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 8 * 60
"""The demo's training budget on this project's 2-core machines (issues 12 and 27)."""


def _as_on_the_records_cpu(cell: Config, record: dict) -> Config:
    """``cell`` with ``auto`` resolved as on the class of CPU that wrote ``record`` (bf16
    where it has bf16 natively, else fp32): what the demo trains there."""
    cls = record["cpu_class"]
    hw = speed.Hardware("cpu", record["device"], cls["native_bf16"], False, cls["isa"])
    amp = speed.choose_amp(cell.train.amp, hw)[0]
    cell.train.amp = amp  # type: ignore[assignment]
    cell.train.channels_last = speed.choose_channels_last(cell.train.channels_last, amp, hw)[0]
    return cell


def _script():
    return load_benchmark("readme_table")


def test_readme_demo_table_is_generated_from_the_committed_record():
    script = _script()
    record = json.loads(script.RECORD.read_text())
    assert script.current_block(script.README.read_text()) == script.block(record), \
        "README.md is stale: run python benchmarks/readme_table.py"


def test_readme_pascal_twin_table_is_generated_from_the_committed_record():
    script = _script()
    record = json.loads(script.TWIN_RECORD.read_text())
    assert {run["label"] for run in record["runs"]} >= {
        "stl", "sl", "xtc", "jtr", "diffusion_mtl", "hitts"}, "issue 31's six methods"
    assert script.current_block(script.README.read_text(), script.TWIN_BEGIN,
                                script.TWIN_END) == script.twin_block(record), \
        "README.md is stale: run python benchmarks/readme_table.py"


@pytest.mark.parametrize("table", ["weightings_cpu", "weightings_cpu_full_width"])
def test_the_weighting_tables_are_generated_from_the_committed_records(table):
    """The docs' weighting-cost tables (docs/concepts/weightings.md)."""
    script = _script()
    path, begin, end = script.WEIGHTINGS_TABLES[table]
    have = script.current_block(script.WEIGHTINGS_PAGE.read_text(), begin, end)
    assert have == script.weightings_block(json.loads(path.read_text()), begin, end), \
        f"{script.WEIGHTINGS_PAGE.name} is stale: run python benchmarks/readme_table.py"


def test_the_cpu_peak_block_is_generated_from_the_committed_records():
    """docs/how-to/speed.md's CPU peak block (issue 27): the demo size and the paper's
    full-width SegNet at 96x128 and 288x384, eager and compiled, each against both ceilings."""
    script = _script()
    records = [json.loads(p.read_text()) for p in script.PEAK_RECORDS]
    settings = {s for r in records for s in r["cells"]}
    assert settings == {"demo", "full_96x128", "full_288x384"}
    for record in records:
        assert record["machine"]["cpu"] and record["machine"]["flags"] and record["command"]
        for row in record["cells"].values():
            assert {"eager", "compiled"} <= set(row)
            assert all("fraction_of_theoretical_peak" in row[m] and "fraction_of_matmul" in row[m]
                       for m in ("eager", "compiled") if row[m]["status"] == "ok")
    have = script.current_block(script.SPEED_PAGE.read_text(), script.PEAK_BEGIN, script.PEAK_END)
    assert have == script.peak_block(records), \
        f"{script.SPEED_PAGE.name} is stale: run python benchmarks/readme_table.py"


def test_the_record_is_of_the_demo_as_defined_today():
    script = _script()
    record = json.loads(script.RECORD.read_text())
    config = script.demo_config(record)
    cells = {(regime, method, seed) for regime, method in grid_cells(config)
             for seed in config.compare.seeds}
    assert {(r["regime"], r["label"], r["seed"]) for r in record["runs"]} == cells
    assert len(config.compare.seeds) >= 3  # a demo that can draw a conclusion
    defaults = flatten(setup_from_config(Config().model_dump()))
    for run in record["runs"]:
        cell = _as_on_the_records_cpu(
            cell_config_for(config, run["regime"], run["label"], run["seed"]), record)
        now = flatten(setup_from_config(cell.model_dump()))
        then = flatten({k: v for k, v in run["setup"].items() if k != "data"})
        assert {k: now[k] for k in then} == then, run["name"]
        # Keys added since the record was made must sit at their defaults (the demo does
        # not use them), else the record no longer shows what the demo does.
        assert {k: now[k] for k in now if k not in then} == \
            {k: defaults[k] for k in now if k not in then}, run["name"]
        assert run["setup"]["data"]["size"] == record["data"]["size"]
    synth = re.search(r"data synth .*--n-train (\d+) --n-val (\d+) --height (\d+) --width (\d+)",
                      (ROOT / "Makefile").read_text())
    data = record["data"]
    assert [int(x) for x in synth.groups()] == [data["n_train"], data["n_val"], *data["size"]]
    assert sum(r["train_seconds_this_session"] for r in record["runs"]) <= BUDGET_SECONDS


def test_the_demo_trains_in_what_the_machine_does_natively():
    """The preset leaves precision and layout to ``auto`` (issue 27: bf16 hard-coded made the
    demo an hour long on CPUs that emulate it); the record says which class of CPU wrote it
    and trained in what that class's ``auto`` gives; the fp32 record (what ``auto`` trains
    in on a CPU without native bf16) is of the same grid and within the budget too."""
    preset = load_config("synthetic_demo")
    assert (preset.train.amp, preset.train.channels_last) == ("auto", "auto")
    script = _script()
    record = json.loads(script.RECORD.read_text())
    cls = record["cpu_class"]
    assert cls["amp"] == ["bf16" if cls["native_bf16"] else "off"]
    assert cls["isa"] in script.current_block(script.README.read_text())
    fp32 = json.loads(script.FP32_RECORD.read_text())
    assert {r["setup"]["train"]["amp"] for r in fp32["runs"]} == {"off"}
    assert fp32["data"] == record["data"] and len(fp32["runs"]) == len(record["runs"])
    assert sum(r["train_seconds_this_session"] for r in fp32["runs"]) <= BUDGET_SECONDS
    assert "--config synthetic_demo " in (ROOT / "Makefile").read_text()
