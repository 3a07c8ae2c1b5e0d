"""`mtpsl report` on hand-made run folders: means, stds, Delta_m, LaTeX bold, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from mtpsl.cli import main
from mtpsl.report import build_report, infer_primary_keys, metric_directions

# (method, seed) -> (miou, abs_err, normal mean); pixel_acc is extra (CSV only)
VALUES = {
    ("stl", 0): (0.40, 0.60, 30.0),
    ("stl", 1): (0.30, 0.80, 32.0),
    ("sl", 0): (0.44, 0.50, 33.0),
    ("sl", 1): (0.42, 0.70, 31.0),
}


def _run(folder, method, seed, miou, abs_err, mean, regime="onelabel", root="data/a"):
    folder.mkdir(parents=True)
    metrics = {"semantic/miou": miou, "semantic/pixel_acc": miou + 0.3,
               "depth/abs_err": abs_err, "depth/rmse": abs_err * 2,
               "normal/mean": mean, "normal/median": mean - 5}
    final = {"method": method, "regime": regime, "seed": seed, "metrics": metrics}
    (folder / "final_metrics.json").write_text(json.dumps(final))
    config = {"name": "x", "dataset": {"name": "nyuv2", "root": root}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def grid(tmp_path):
    for (method, seed), v in VALUES.items():
        _run(tmp_path / "grid" / "onelabel" / method / f"seed{seed}", method, seed, *v)
    return tmp_path / "grid"


def _hand_rows():
    def stats(method, k):
        vals = [VALUES[(method, s)][k] for s in (0, 1)]
        return np.mean(vals), np.std(vals)

    base = [stats("stl", k)[0] for k in range(3)]
    signs = [1, -1, -1]
    gains = {}
    for method in ("stl", "sl"):
        per_seed = [np.mean([signs[k] * (VALUES[(method, s)][k] - base[k]) / base[k] * 100
                             for k in range(3)]) for s in (0, 1)]
        gains[method] = (np.mean(per_seed), np.std(per_seed))
    return stats, gains


def test_keys_directions_and_primaries_come_from_the_registries():
    keys = ["semantic/miou", "semantic/pixel_acc", "depth/abs_err", "depth/rmse",
            "normal/mean", "normal/rmse"]
    assert infer_primary_keys(keys) == ["semantic/miou", "depth/abs_err", "normal/mean"]
    assert metric_directions(["semantic/miou", "depth/abs_err", "normal/within_30"]) == {
        "semantic/miou": True, "depth/abs_err": False, "normal/within_30": True}


def test_report_means_stds_and_delta_m_match_hand_computation(grid, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    stats, gains = _hand_rows()
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["method"] for r in rows] == ["stl", "sl"]  # baseline first in its group
    assert rows[0]["dataset"] == "nyuv2:data/a" and rows[0]["regime"] == "onelabel"
    for row in rows:
        method = row["method"]
        assert int(row["seeds"]) == 2
        for k, key in enumerate(["semantic/miou", "depth/abs_err", "normal/mean"]):
            mean, std = stats(method, k)
            assert float(row[key]) == pytest.approx(mean)
            assert float(row[f"{key}:std"]) == pytest.approx(std)
        assert float(row["delta_m"]) == pytest.approx(gains[method][0])
        assert float(row["delta_m:std"]) == pytest.approx(gains[method][1])
        extra = [VALUES[(method, s)][0] + 0.3 for s in (0, 1)]
        assert float(row["semantic/pixel_acc"]) == pytest.approx(np.mean(extra))
        assert len(row["runs"].split(";")) == 2
    assert abs(gains["stl"][0]) < 1e-9
    line = next(x for x in printed.splitlines() if "| sl |" in x)
    assert f"{gains['sl'][0]:.4f} ± {gains['sl'][1]:.4f}" in line
    assert "semantic/miou ↑" in printed and "depth/abs_err ↓" in printed
    assert "depth/rmse" not in printed  # only primary metrics in the Markdown


def test_latex_is_booktabs_with_arrows_and_the_best_in_bold(grid, tmp_path):
    assert main(["report", str(grid), "--out", str(tmp_path / "o")]) == 0
    tex = (tmp_path / "o" / "report.tex").read_text()
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"semantic/miou $\uparrow$",
                  r"depth/abs\_err $\downarrow$", r"$\Delta_m$"):
        assert piece in tex, piece
    stl, sl = (next(x for x in tex.splitlines() if x.startswith(f"nyuv2:data/a & onelabel & {m} "))
               for m in ("stl", "sl"))
    cells = [c.strip() for c in sl.removesuffix(r"\\").split("&")]
    stl_cells = [c.strip() for c in stl.removesuffix(r"\\").split("&")]
    # sl: miou 0.43 > 0.35 (best), abs_err 0.6 < 0.7 (best), normal 32.0 == 31.0? no: stl 31.0
    assert cells[4] == r"$\mathbf{0.4300 \pm 0.0100}$"
    assert cells[5] == r"$\mathbf{0.6000 \pm 0.1000}$"
    assert cells[6] == r"$32.0000 \pm 1.0000$"
    assert stl_cells[6] == r"$\mathbf{31.0000 \pm 1.0000}$"
    assert stl_cells[4].startswith("$0.3500") and "mathbf" not in stl_cells[4]
    assert cells[7].startswith(r"$\mathbf{")  # sl has the better Delta_m


def test_missing_baseline_is_said_and_delta_m_omitted(grid, tmp_path, capsys):
    assert main(["report", str(grid / "onelabel" / "sl"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "baseline method 'stl' not found anywhere" in printed
    assert "Δm" not in printed.splitlines()[0]
    assert "delta_m" not in (tmp_path / "o" / "report.csv").read_text()
    assert r"\Delta_m" not in (tmp_path / "o" / "report.tex").read_text()
    assert main(["report", str(grid), "--baseline", "sl", "--out", str(tmp_path / "p")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "report.csv")))
    assert rows[0]["method"] == "sl" and abs(float(rows[0]["delta_m"])) < 1e-9


def test_groups_by_dataset_and_regime_and_defaults_out_to_the_common_folder(grid, tmp_path):
    _run(tmp_path / "grid" / "random" / "sl" / "seed0", "sl", 0, 0.5, 0.5, 30.0, "random")
    _run(tmp_path / "other" / "r", "stl", 0, 0.5, 0.5, 30.0, root="data/b")
    report = build_report([grid, tmp_path / "other" / "r"])
    keys = [(r["dataset"], r["regime"], r["method"]) for r in report["rows"]]
    assert keys == [("nyuv2:data/a", "onelabel", "stl"), ("nyuv2:data/a", "onelabel", "sl"),
                    ("nyuv2:data/a", "random", "sl"), ("nyuv2:data/b", "onelabel", "stl")]
    assert "delta_m" not in report["rows"][2]  # no stl under regime "random"
    assert "under nyuv2:data/a / random" in report["markdown"]
    assert main(["report", str(grid / "random"), str(grid / "onelabel")]) == 0
    assert (grid / "report.md").is_file() and (grid / "report.tex").is_file()


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no runs" in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "final_metrics.json").write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "final_metrics.json" in capsys.readouterr().err


def test_per_source_tables_use_the_keys_each_source_has(tmp_path, capsys):
    """Hand-made cross-dataset runs: source S lacks depth, so its Δm is over mIoU alone; runs
    that disagree on compare.delta_metrics fall back to the primary metrics, with a note."""
    for method, miou, err, delta in (("stl", 0.5, 0.4, None), ("sl", 0.6, 0.2, ["depth/rmse"])):
        folder = tmp_path / method
        _run(folder, method, 0, miou, err, 30.0)
        final = json.loads((folder / "final_metrics.json").read_text())
        final["metrics@S"] = {"semantic/miou": miou / 2, "semantic/pixel_acc": 0.1}
        (folder / "final_metrics.json").write_text(json.dumps(final))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["compare"] = {"delta_metrics": delta}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    report = build_report([tmp_path])
    eval_table, source = report["tables"]
    assert source.source == "S" and source.primary == ["semantic/miou"]
    sl = next(r for r in source.rows if r["method"] == "sl")
    assert sl["delta_m"] == pytest.approx((0.3 - 0.25) / 0.25 * 100)
    assert eval_table.primary == ["semantic/miou", "depth/abs_err", "normal/mean"]
    assert "disagree on compare.delta_metrics" in report["markdown"]
    assert "Evaluated on source S (Δm over semantic/miou):" in report["markdown"]
    chosen = build_report([tmp_path], delta_metrics=["depth/rmse"])
    assert chosen["tables"][1].primary == [] and "delta_m" not in chosen["tables"][1].rows[1]
    sl = chosen["rows"][1]
    assert sl["delta_m"] == pytest.approx(-(0.4 - 0.8) / 0.8 * 100)  # rmse = 2 * abs_err


def test_variants_of_one_method_stay_separate_rows(tmp_path):
    """Two compare variants running the same method (e.g. sl under uniform and under
    pcgrad weighting) are told apart by their label, not merged into one row."""
    for label, miou in (("mtl", 0.40), ("pcgrad", 0.50)):
        folder = tmp_path / "g" / "onelabel" / label / "seed0"
        _run(folder, "sl", 0, miou, 0.5, 30.0)
        final = json.loads((folder / "final_metrics.json").read_text())
        (folder / "final_metrics.json").write_text(json.dumps({**final, "label": label}))
    code = main(["report", str(tmp_path / "g"), "--baseline", "mtl", "--out",
                 str(tmp_path / "rep")])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert [r["method"] for r in rows] == ["mtl", "pcgrad"]
    assert [r["seeds"] for r in rows] == ["1", "1"]
