"""`mtpsl report` on hand-made run folders: set-up rows, seed statistics against scipy.stats,
paired Delta_m, labels, duplicate seeds, LaTeX bold, the per-seed figure, errors."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from mtpsl.analysis.report import build_report, infer_primary_keys, metric_directions
from mtpsl.cli import main
from mtpsl.core.signature import labels, setup_from_config, signature

KEYS = ["semantic/miou", "depth/abs_err", "normal/mean"]
SIGNS = [1, -1, -1]  # higher is better for miou only
# (method, seed) -> (miou, abs_err, normal mean); pixel_acc is extra (CSV only)
VALUES = {
    ("stl", 0): (0.40, 0.60, 30.0),
    ("stl", 1): (0.30, 0.80, 32.0),
    ("stl", 2): (0.35, 0.70, 31.0),
    ("sl", 0): (0.44, 0.50, 33.0),
    ("sl", 1): (0.42, 0.70, 31.0),
    ("sl", 2): (0.41, 0.55, 31.5),
}
SETUP = {"dataset": {"name": "nyuv2"}, "labels": {"regime": "onelabel", "seed": "run seed"},
         "model": {"name": "segnet", "width": 0.25}, "method": {"name": "sl",
         "weighting": "uniform", "options": {}}, "train": {"epochs": 10},
         "data": {"train": "f0", "eval": "f1", "size": [64, 96]}}


def _setup(method="sl", **changes) -> dict:
    setup = copy.deepcopy(SETUP)
    setup["method"]["name"] = method
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setup[section][key] = value
    return setup


def _run(folder, method, seed, miou, abs_err, mean, regime="onelabel", root="data/a",
         setup=None, label=None, split=None):
    """A run folder; with ``setup`` in today's format, without it in the older one."""
    folder.mkdir(parents=True)
    metrics = {"semantic/miou": miou, "semantic/pixel_acc": miou + 0.3,
               "depth/abs_err": abs_err, "depth/rmse": abs_err * 2,
               "normal/mean": mean, "normal/median": mean - 5}
    final = {"method": method, "regime": regime, "seed": seed, "metrics": metrics}
    if label is not None:
        final["label"] = label
    if setup is not None:
        final["setup"] = setup
        final["pairing"] = {"split": split or f"split{seed}", "initial_weights": f"w{seed}"}
    (folder / "final_metrics.json").write_text(json.dumps(final))
    config = {"name": "x", "dataset": {"name": "nyuv2", "root": root}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture
def grid(tmp_path):
    for (method, seed), v in VALUES.items():
        _run(tmp_path / "grid" / "onelabel" / method / f"seed{seed}", method, seed, *v,
             setup=_setup(method))
    return tmp_path / "grid"


def _column(method, k):
    return np.array([VALUES[(method, s)][k] for s in (0, 1, 2)])


def _gains(method):
    """Per-seed Delta_m of ``method`` against stl's run of the same seed, by hand."""
    return np.array([np.mean([SIGNS[k] * (VALUES[(method, s)][k] - VALUES[("stl", s)][k])
                              / VALUES[("stl", s)][k] * 100 for k in range(3)])
                     for s in (0, 1, 2)])


def _t_interval(values):
    values = np.asarray(values)
    return scipy_stats.t.interval(0.95, len(values) - 1, loc=values.mean(),
                                  scale=scipy_stats.sem(values))


def test_keys_directions_and_primaries_come_from_the_registries():
    keys = ["semantic/miou", "semantic/pixel_acc", "depth/abs_err", "depth/rmse",
            "normal/mean", "normal/rmse"]
    assert infer_primary_keys(keys) == KEYS
    assert metric_directions(["semantic/miou", "depth/abs_err", "normal/within_30"]) == {
        "semantic/miou": True, "depth/abs_err": False, "normal/within_30": True}


def test_statistics_match_scipy(grid, tmp_path, capsys):
    """Means, sample stds and Student-t intervals per set-up; the paired differences and
    Delta_m against the baseline, their intervals, and a mark exactly where scipy's paired
    t-test rejects at 5%."""
    out = tmp_path / "out"
    assert main(["report", str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [r["method"] for r in rows] == ["stl", "sl"]  # baseline first
    for row in rows:
        method = row["method"]
        assert int(row["seeds"]) == 3 and row["seed_list"] == "0,1,2"
        for k, key in enumerate(KEYS):
            values = _column(method, k)
            assert float(row[key]) == pytest.approx(values.mean())
            assert float(row[f"{key}:std"]) == pytest.approx(values.std(ddof=1))
            low, high = _t_interval(values)
            assert float(row[f"{key}:ci_low"]) == pytest.approx(low)
            assert float(row[f"{key}:ci_high"]) == pytest.approx(high)
        assert len(row["runs"].split(";")) == 3
    sl = rows[1]
    gains = _gains("sl")
    assert float(sl["delta_m"]) == pytest.approx(gains.mean())
    assert (float(sl["delta_m:ci_low"]), float(sl["delta_m:ci_high"])) == \
        pytest.approx(_t_interval(gains))
    assert abs(float(rows[0]["delta_m"])) < 1e-12 and rows[0]["verdict"] == ""
    paired_line = next(x for x in printed.split("Paired against")[1].splitlines()
                       if x.startswith("| sl |"))
    for k, key in enumerate(KEYS):
        a, b = _column("sl", k), _column("stl", k)
        low, high = _t_interval(a - b)
        assert float(sl[f"{key}:diff"]) == pytest.approx((a - b).mean())
        assert (float(sl[f"{key}:diff:ci_low"]), float(sl[f"{key}:diff:ci_high"])) == \
            pytest.approx((low, high))
        significant = scipy_stats.ttest_rel(a, b).pvalue < 0.05
        cell = paired_line.split("|")[3 + k]
        assert cell.strip().endswith("*") == significant, (key, cell)
    significant = scipy_stats.ttest_1samp(gains, 0.0).pvalue < 0.05
    assert sl["verdict"] == ("significantly " + ("better" if gains.mean() > 0 else "worse")
                             if significant else "not significant")
    assert f"- sl vs stl: Δm {gains.mean():+.1f}%" in printed
    assert main(["report", str(grid), "--out", str(out), "--contrast", "sl:stl",
                 "--contrast", "sl:xtcc"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(f"- sl vs stl: Δm {gains.mean():+.1f}%") == 1  # not repeated
    assert "- sl vs xtcc: no set-up holds both with a shared seed; not compared" in printed
    assert main(["report", str(grid), "--contrast", "sl"]) == 2
    assert "over 3 paired seeds" in printed
    main_line = next(x for x in printed.splitlines() if x.startswith("| sl | 3 |"))
    half = (_t_interval(_column("sl", 0))[1] - _t_interval(_column("sl", 0))[0]) / 2
    assert f"{_column('sl', 0).mean():.4f} ± {half:.4f}" in main_line
    assert "depth/rmse" not in printed  # only primary metrics in the Markdown
    assert (out / "report.png").is_file() and (out / "report.pdf").is_file()


def test_constructed_significant_and_insignificant_differences(tmp_path):
    """A method better on every seed by a steady margin is marked; a noisy one is not."""
    base = [0.30, 0.40, 0.35, 0.45]
    for seed, b in enumerate(base):
        _run(tmp_path / f"stl{seed}", "stl", seed, b, 0.5, 30.0, setup=_setup("stl"))
        _run(tmp_path / f"good{seed}", "sl", seed, b + 0.05 + 0.001 * seed, 0.5, 30.0,
             setup=_setup("sl"))
        _run(tmp_path / f"noisy{seed}", "xtc", seed, b + (0.1 if seed % 2 else -0.09), 0.5,
             30.0, setup=_setup("xtc"))
    rows = {r["method"]: r for r in build_report([tmp_path])["rows"]}
    assert rows["sl"]["verdict"] == "significantly better"
    assert rows["xtc"]["verdict"] == "not significant"
    for method in ("sl", "xtc"):
        diffs = [rows[method]["_points"]["semantic/miou"][s] - base[s] for s in range(4)]
        p = scipy_stats.ttest_1samp(diffs, 0.0).pvalue
        assert (p < 0.05) == (rows[method]["verdict"] != "not significant")


def test_fewer_than_three_seeds_draw_no_conclusion(tmp_path, capsys):
    for seed in (0, 1):
        _run(tmp_path / f"stl{seed}", "stl", seed, 0.3, 0.5, 30.0 + seed, setup=_setup("stl"))
        _run(tmp_path / f"sl{seed}", "sl", seed, 0.9, 0.5, 30.0 + seed, setup=_setup("sl"))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "no conclusion (2 paired seeds, need 3)" in printed
    assert "fewer than 3 seeds support no conclusion" in printed
    paired = printed.split("Paired against")[1]
    assert " *" not in next(x for x in paired.splitlines() if x.startswith("| sl |"))


def test_two_weightings_and_two_models_are_separate_labelled_rows(tmp_path, capsys):
    """The issue's case: sl under uniform and CAGrad on SegNet and ResNet-18, all seeds 0-2,
    and an stl baseline per model: four set-ups, named by what differs, each compared with
    the stl of its own model."""
    for model in ("segnet", "resnet18"):
        for seed in range(3):
            for method, weighting in (("stl", "uniform"), ("sl", "uniform"), ("sl", "cagrad")):
                folder = tmp_path / model / f"{method}-{weighting}" / f"seed{seed}"
                setup = _setup(method, model__name=model, method__weighting=weighting)
                miou = 0.3 + 0.01 * seed + (weighting == "cagrad") * 0.02 + \
                    (model == "resnet18") * 0.1
                _run(folder, method, seed, miou, 0.5, 30.0, setup=setup)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "o" / "report.csv")))
    names = [(r["setup"], r["method"], r["seeds"]) for r in rows]
    assert names == [("resnet18", "stl · uniform", "3"), ("resnet18", "sl · cagrad", "3"),
                     ("resnet18", "sl · uniform", "3"), ("segnet", "stl · uniform", "3"),
                     ("segnet", "sl · cagrad", "3"), ("segnet", "sl · uniform", "3")]
    cagrad = next(r for r in rows if r["setup"] == "resnet18" and "cagrad" in r["method"])
    assert float(cagrad["semantic/miou:diff"]) == pytest.approx(0.02)  # vs resnet18's stl
    assert "| set-up | method | seeds |" in printed
    assert all(r["semantic/miou:ci_low"] for r in rows)


def test_the_same_seed_twice_in_one_setup_is_an_error_naming_both(grid, tmp_path, capsys):
    _run(tmp_path / "again", "sl", 1, 0.5, 0.5, 30.0, setup=_setup("sl"))
    assert main(["report", str(grid), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "seed 1" in err and str(tmp_path / "again") in err
    assert str(grid / "onelabel" / "sl" / "seed1") in err


def test_runs_pair_only_on_the_same_split(tmp_path):
    """A baseline seed drawn with another split is not a pair (e.g. a fixed labels.seed in
    one set-up's runs and not in the other's)."""
    for seed in range(3):
        _run(tmp_path / f"stl{seed}", "stl", seed, 0.3, 0.5, 30.0, setup=_setup("stl"))
        _run(tmp_path / f"sl{seed}", "sl", seed, 0.4, 0.5, 30.0, setup=_setup("sl"),
             split="other" if seed == 2 else None)
    sl = build_report([tmp_path])["rows"][1]
    assert sl["pairs"] == 2 and sl["verdict"].startswith("no conclusion")


def test_labels_name_what_differs():
    setups = [_setup("sl", method__weighting="uniform"), _setup("sl", method__weighting="cagrad"),
              _setup("xtc", method__options={"con_weight": 2.0})]
    assert labels([{"method": s["method"]} for s in setups], first=["sl", "sl", "xtc"],
                  skip=["method.name"]) == ["sl · uniform", "sl · cagrad", "xtc · uniform"]
    widths = [_setup(model__width=w) for w in (0.25, 0.5)]
    assert labels(widths) == ["width=0.25", "width=0.5"]
    assert signature(widths[0]) != signature(widths[1])
    assert signature(SETUP) == signature(json.loads(json.dumps(SETUP, sort_keys=True)))
    config = {"name": "a", "seed": 3, "dataset": {"name": "nyuv2", "root": "x"},
              "labels": {"seed": None}, "train": {"device": "cpu", "epochs": 2}}
    assert setup_from_config(config) == {"dataset": {"name": "nyuv2"},
                                         "labels": {"seed": "run seed"}, "train": {"epochs": 2}}


def test_latex_is_booktabs_with_arrows_and_the_best_in_bold(grid, tmp_path):
    assert main(["report", str(grid), "--out", str(tmp_path / "o")]) == 0
    tex = (tmp_path / "o" / "report.tex").read_text()
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"semantic/miou $\uparrow$",
                  r"depth/abs\_err $\downarrow$", r"$\Delta_m$"):
        assert piece in tex, piece
    stl, sl = (next(x for x in tex.splitlines() if x.startswith(f"{m} & 3 &"))
               for m in ("stl", "sl"))
    cells = [c.strip() for c in sl.removesuffix(r"\\").split("&")]
    stl_cells = [c.strip() for c in stl.removesuffix(r"\\").split("&")]
    # sl: miou 0.4233 > 0.35 (best), abs_err 0.5833 < 0.7 (best), normal 31.83 > 31.0
    assert cells[2].startswith(r"$\mathbf{0.4233 \pm ")
    assert cells[3].startswith(r"$\mathbf{0.5833 \pm ")
    assert cells[4].startswith(r"$31.8333 \pm ")
    assert stl_cells[4].startswith(r"$\mathbf{31.0000 \pm ")
    assert stl_cells[2].startswith("$0.3500") and "mathbf" not in stl_cells[2]


def test_missing_baseline_is_said_and_delta_m_omitted(grid, tmp_path, capsys):
    assert main(["report", str(grid / "onelabel" / "sl"), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "baseline 'stl' found anywhere" in printed
    assert "Δm" not in printed.splitlines()[0]
    assert "delta_m" not in (tmp_path / "o" / "report.csv").read_text()
    assert r"\Delta_m" not in (tmp_path / "o" / "report.tex").read_text()
    assert main(["report", str(grid), "--baseline", "sl", "--out", str(tmp_path / "p")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "p" / "report.csv")))
    assert rows[0]["method"] == "sl" and abs(float(rows[0]["delta_m"])) < 1e-9


def test_older_runs_group_by_their_config_and_dataset_root(tmp_path):
    """Runs without a recorded set-up: the regime and the dataset root (standing in for the
    data's fingerprint) still separate them, and one seed each is no conclusion."""
    for method in ("stl", "sl"):
        _run(tmp_path / "g" / "onelabel" / method, method, 0, 0.4, 0.5, 30.0)
    _run(tmp_path / "g" / "random" / "sl", "sl", 0, 0.5, 0.5, 30.0, "random")
    _run(tmp_path / "other" / "r", "stl", 0, 0.5, 0.5, 30.0, root="data/b")
    report = build_report([tmp_path / "g", tmp_path / "other" / "r"])
    keys = [(r["setup"], r["method"]) for r in report["rows"]]
    assert keys == [("data/a · onelabel", "stl"), ("data/a · onelabel", "sl"),
                    ("data/a · random", "sl"), ("data/b · onelabel", "stl")]
    assert "delta_m" not in report["rows"][2]  # no stl under regime "random"
    assert "under data/a · random" in report["markdown"]
    assert report["rows"][1]["verdict"] == "no conclusion (1 paired seed, need 3)"
    assert main(["report", str(tmp_path / "g" / "random"), str(tmp_path / "g" / "onelabel")]) \
        == 0
    assert (tmp_path / "g" / "report.md").is_file() and (tmp_path / "g" / "report.tex").is_file()


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
    assert eval_table.primary == KEYS
    assert "disagree on compare.delta_metrics" in report["markdown"]
    assert "Evaluated on source S (Δm over semantic/miou):" in report["markdown"]
    chosen = build_report([tmp_path], delta_metrics=["depth/rmse"])
    assert chosen["tables"][1].primary == [] and "delta_m" not in chosen["tables"][1].rows[1]
    sl = chosen["rows"][1]
    assert sl["delta_m"] == pytest.approx(-(0.4 - 0.8) / 0.8 * 100)  # rmse = 2 * abs_err


def test_variants_of_one_method_stay_separate_rows(tmp_path):
    """Two compare variants running the same method (sl under uniform and under pcgrad
    weighting) are told apart by their set-up and named by their label."""
    for label, miou, weighting in (("mtl", 0.40, "uniform"), ("pcgrad", 0.50, "pcgrad")):
        folder = tmp_path / "g" / "onelabel" / label / "seed0"
        _run(folder, "sl", 0, miou, 0.5, 30.0, setup=_setup(method__weighting=weighting),
             label=label)
    code = main(["report", str(tmp_path / "g"), "--baseline", "mtl", "--out",
                 str(tmp_path / "rep")])
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert [r["method"] for r in rows] == ["mtl · uniform", "pcgrad"]
    assert [r["seeds"] for r in rows] == ["1", "1"]


def test_seeds_figure_view(grid, tmp_path, capsys):
    assert main(["figures", "seeds", "--runs", str(grid), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "seeds.png").is_file() and (tmp_path / "f" / "seeds.pdf").is_file()


def _backbone(name="resnet", depth=50, arch=None):
    return {"name": name, "depth": depth, "arch": arch, "weights": None, "output_stride": 8,
            "options": {}}


def test_setups_are_named_by_keys_meaningful_for_their_model(tmp_path):
    """SegNet ignores model.backbone: a SegNet row is not named by the ResNet depth it never
    used, while two ResNet depths are told apart by it."""
    cases = [("segnet", _backbone(depth=50)), ("resnet", _backbone(depth=18)),
             ("resnet", _backbone(depth=50))]
    for n, (model, backbone) in enumerate(cases):
        for method in ("stl", "sl"):
            setup = _setup(method, model__name=model, model__backbone=backbone)
            _run(tmp_path / f"{model}{n}" / method, method, 0, 0.3 + 0.01 * n, 0.5, 30.0,
                 setup=setup)
    rows = build_report([tmp_path])["rows"]
    assert sorted({r["setup"] for r in rows}) == ["resnet · depth=18", "resnet · depth=50",
                                                  "segnet"]
    from mtpsl.analysis.report import meaningful

    segnet = _setup(model__name="segnet", model__backbone=_backbone())
    assert "backbone" not in meaningful(segnet)["model"]
    timm = meaningful(_setup(model__name="resnet",
                             model__backbone=_backbone("timm", arch="convnext_atto")))
    assert "depth" not in timm["model"]["backbone"] and "arch" in timm["model"]["backbone"]
    assert signature(segnet) != signature(meaningful(segnet))  # signatures keep every key


def test_report_figure_grows_with_its_rows(tmp_path):
    """One line per set-up: twelve set-ups take six lines more than six do, every name
    readable (not rotated tick labels squeezed into a fixed width)."""
    from PIL import Image

    from mtpsl.analysis.figures import common
    from mtpsl.analysis.figures.seeds import ROW_IN, short_name

    heights = []
    for count in (6, 12):
        folder = tmp_path / f"g{count}"
        for k in range(count):
            method = "stl" if k == 0 else "sl"
            setup = _setup(method, method__weighting=f"weighting{k}")
            for seed in range(2):
                _run(folder / f"w{k}" / f"seed{seed}", method, seed, 0.3 + 0.01 * k + 0.001
                     * seed, 0.5, 30.0, setup=setup)
        assert main(["report", str(folder), "--out", str(tmp_path / f"o{count}")]) == 0
        with Image.open(tmp_path / f"o{count}" / "report.png") as img:
            heights.append(img.size[1])
    assert heights[1] - heights[0] == round(6 * ROW_IN * common.DPI)
    assert short_name("x" * 100).count("…") == 1 and len(short_name("x" * 100)) == 48
    assert short_name("short") == "short"
