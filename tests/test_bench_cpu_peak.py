"""benchmarks/bench_cpu_peak.py: the peak it derives from the CPU's description, and one cell
(the real XTC step, counted, timed and profiled) at a tiny size. No timing is asserted."""

from __future__ import annotations

import pytest

from conftest import load_benchmark

ZEN3 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1",
        "flags": "fma avx2 sse4_2"}
ZEN4 = {**ZEN3, "model": "17", "flags": "fma avx2 avx512f avx512_bf16"}
INTEL_AVX2 = {"vendor_id": "GenuineIntel", "cpu family": "6", "model": "158",
              "flags": "fma avx2"}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_cpu_peak")


@pytest.mark.parametrize(("info", "per_cycle", "named"), [
    (ZEN3, 32, "Zen 3"), (ZEN4, 32, "Zen 4"), (INTEL_AVX2, 32, "AVX2"),
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "flags": "avx512f"}, 64, "Zen 5"),
    ({"vendor_id": "AuthenticAMD", "cpu family": "23", "model": "1", "flags": "fma avx2"}, 16,
     "Zen 1"),
])
def test_fma_width_follows_the_core_design(bench, info, per_cycle, named):
    got, how = bench.fma_flops_per_cycle(info)
    assert got == per_cycle and named in how


def test_the_peak_is_cores_times_clock_times_width(bench, monkeypatch):
    monkeypatch.setattr(bench, "proc_cpuinfo", lambda: {**ZEN4, "model name": "AMD EPYC",
                                                   "cpu MHz": "2500.0"})
    monkeypatch.setattr(bench, "physical_cores", lambda cpus: 1)  # two SMT siblings
    cpu = bench.machine(threads=2)
    assert cpu["physical_cores_used"] == 1
    assert cpu["theoretical_fp32_gflops"] == pytest.approx(1 * 2.5 * 32)
    assert "1 cores x 2.500 GHz" in cpu["peak_derivation"]


def test_a_cell_counts_times_and_profiles_the_xtc_step(bench, monkeypatch):
    monkeypatch.setitem(bench.SETTINGS, "tiny", {"width_mult": 0.0625, "height": 32,
                                                 "width": 48, "batch_size": 2, "about": "t"})
    monkeypatch.setitem(bench.STEPS, "tiny", 2)
    cell = bench.run_cell("tiny", "xtc", False, "off", True)
    assert cell["flops_per_step"] > 0 and cell["s_per_step"] > 0
    kinds = cell["profile"]["by_kind"]
    assert "convolution" in kinds and "max-pool with indices" in kinds
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1, abs=0.02)
    row = {"eager": {**cell, "status": "ok", "gflops": 1.0, "fraction_of_theoretical_peak": 0.5,
                     "fraction_of_matmul": 0.4}}
    assert "| tiny | eager |" in bench.table({"tiny": row})
