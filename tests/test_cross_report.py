"""Cross-dataset reporting: per-source tables with Delta_m in `mtpsl compare` / `mtpsl report`,
the one route to a table's Delta_m metrics, and effective label counts in final_metrics.json."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from torch.utils.data import Subset

from mtpsl.analysis.report import table_metrics
from mtpsl.cli import main
from mtpsl.data.cross_domain import write_synthetic_pair
from mtpsl.data.splits import Split, make_split
from mtpsl.engine.summary import label_availability
from mtpsl.engine.summary import split_counts as _split_counts
from mtpsl.tasks import TASKS, build_task
from mtpsl.tasks.scoring import higher_is_better, primary_keys

from conftest import TINY_TRAIN

TINY = [
    *TINY_TRAIN,
    "train.device=cpu",
    "dataset.augment.scales=[1.0]",
]
DELTA = ("semantic/miou", "depth/rmse")  # synthetic_semimtl's compare.delta_metrics
N_TRAIN = 4


@pytest.fixture(scope="module")
def pair_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    write_synthetic_pair(
        root, layout="cityscapes", n_train=N_TRAIN, n_val=2, height=32, width=48, progress=False
    )
    # Source A lacks one segmentation label: the effective counts must see the gap.
    (root / "domain_a" / "train" / "label_7" / "1.npy").unlink()
    return root


@pytest.fixture(scope="module")
def grid(pair_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "g"
    code = main(
        [
            "compare",
            "--config",
            "synthetic_semimtl",
            "--out",
            str(out),
            "--methods",
            "jtl_stl,jtl",
            "--seeds",
            "0",
            f"dataset.root={pair_root}",
            *TINY,
        ]
    )
    assert code == 0
    return out


def _final(grid, method):
    return json.loads((grid / "full" / method / "seed0" / "final_metrics.json").read_text())


def _hand_delta(metrics, base, keys):
    signs = {"semantic/miou": 1.0, "depth/rmse": -1.0, "depth/abs_err": -1.0}
    return float(np.mean([signs[k] * (metrics[k] - base[k]) / base[k] * 100 for k in keys]))


def _csv(path):
    return list(csv.DictReader(open(path)))


def test_compare_writes_one_table_per_source_with_hand_checked_delta_m(grid, capsys):
    text = (grid / "results.md").read_text()
    for source in ("A", "B"):
        assert f"Evaluated on source {source} (Δm over semantic/miou, depth/rmse):" in text
    assert text.count("Δm % vs jtl_stl ↑") == 3  # eval/, A, B
    rows = _csv(grid / "results.csv")
    assert [(r["eval_set"], r["method"]) for r in rows] == [
        (s, m) for s in ("eval", "A", "B") for m in ("jtl_stl", "jtl")
    ]
    stl, jtl = _final(grid, "jtl_stl"), _final(grid, "jtl")
    for row in rows:
        field = "metrics" if row["eval_set"] == "eval" else f"metrics@{row['eval_set']}"
        run = stl if row["method"] == "jtl_stl" else jtl
        expected = _hand_delta(run[field], stl[field], DELTA)
        assert float(row["delta_m"]) == pytest.approx(expected, abs=1e-9)
        for key in DELTA:
            assert float(row[key]) == pytest.approx(run[field][key])
    # The Markdown shows the same number, under the source's heading.
    section = text.split("Evaluated on source B")[1]
    line = next(x for x in section.splitlines() if "| jtl |" in x)
    gain = _hand_delta(jtl["metrics@B"], stl["metrics@B"], DELTA)
    assert line.rstrip(" |").endswith(f"{gain:+.2f}".replace("-0.00", "+0.00"))
    assert "semantic/miou ↑ | depth/rmse ↓" in text and "depth/abs_err" not in text


def test_report_rebuilds_the_per_source_tables_from_the_run_folders(grid, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(grid), "--baseline", "jtl_stl", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    assert "Evaluated on source A (Δm over semantic/miou, depth/rmse):" in printed
    assert "semantic/miou, depth/rmse (compare.delta_metrics of the runs)" in printed
    tex = (out / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 3 and "% evaluated on source B" in tex
    compared = {(r["eval_set"], r["method"]): r for r in _csv(grid / "results.csv")}
    for row in _csv(out / "report.csv"):
        same = compared[(row["eval_set"], row["method"])]
        assert float(row["delta_m"]) == pytest.approx(float(same["delta_m"]), abs=1e-9)
    # --delta-metrics overrides the runs' choice: Delta_m over mIoU alone, per source.
    assert (
        main(
            [
                "report",
                str(grid),
                "--baseline",
                "jtl_stl",
                "--out",
                str(tmp_path / "m"),
                "--delta-metrics",
                "semantic/miou",
            ]
        )
        == 0
    )
    stl, jtl = _final(grid, "jtl_stl"), _final(grid, "jtl")
    rows = {(r["eval_set"], r["method"]): r for r in _csv(tmp_path / "m" / "report.csv")}
    for source in ("A", "B"):
        expected = _hand_delta(
            jtl[f"metrics@{source}"], stl[f"metrics@{source}"], ["semantic/miou"]
        )
        assert float(rows[(source, "jtl")]["delta_m"]) == pytest.approx(expected, abs=1e-9)
        assert "depth/rmse ↓" not in (tmp_path / "m" / "report.md").read_text()
    assert main(["report", str(grid), "--delta-metrics", "semantic/nope"]) == 2
    assert "--delta-metrics" in capsys.readouterr().err


def test_split_counts_are_the_labels_each_source_has(grid, pair_root):
    final = _final(grid, "jtl")
    # Brute force: the split's matrix AND the label files on disk, per source.
    split = json.loads((grid / "full" / "jtl" / "seed0" / "split.json").read_text())
    labelled = np.array(split["labelled"], dtype=bool)
    assert split["tasks"] == ["semantic", "depth"]
    on_disk = np.zeros_like(labelled)
    folders = {"semantic": "label_7", "depth": "depth"}
    own = {"A": ("domain_a", "semantic"), "B": ("domain_b", "depth")}
    for d, (folder, task) in enumerate(own.values()):
        t = split["tasks"].index(task)
        for i in range(N_TRAIN):
            path = pair_root / folder / "train" / folders[task] / f"{i}.npy"
            on_disk[d * N_TRAIN + i, t] = path.is_file()
    effective = labelled & on_disk
    assert final["split"] == {
        "semantic": int(effective[:, 0].sum()),
        "depth": int(effective[:, 1].sum()),
    }
    assert final["split"] == {"semantic": N_TRAIN - 1, "depth": N_TRAIN}
    detail = final["split_detail"]
    assert detail["labelled_by_regime"] == {"semantic": 2 * N_TRAIN, "depth": 2 * N_TRAIN}
    assert detail["images"] == 2 * N_TRAIN
    assert detail["per_source"] == {
        "A": {"images": N_TRAIN, "semantic": N_TRAIN - 1, "depth": 0},
        "B": {"images": N_TRAIN, "semantic": 0, "depth": N_TRAIN},
    }


def test_a_bad_delta_metrics_key_stops_compare_before_training(pair_root, tmp_path, capsys):
    out = tmp_path / "g"
    code = main(
        [
            "compare",
            "--config",
            "synthetic_semimtl",
            "--out",
            str(out),
            "--methods",
            "jtl_stl",
            "--seeds",
            "0",
            f"dataset.root={pair_root}",
            "compare.delta_metrics=[semantic/mIoU]",
            *TINY,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "compare.delta_metrics" in err and "semantic/miou" in err
    assert not out.exists()


def test_one_route_to_primary_metrics_agrees_with_the_task_definitions():
    """table_metrics (metric keys only) = the tasks' primary_metric and metric directions."""
    options = {"segmentation": {"num_classes": 5}}
    tasks = {
        f"t_{kind}": build_task(kind, f"t_{kind}", **options.get(kind, {}))
        for kind in TASKS.names()
    }
    better = higher_is_better(tasks)
    primary, directions = table_metrics(list(better))
    assert primary == primary_keys(tasks)
    assert directions == {k: better[k] for k in primary}
    chosen, _ = table_metrics(list(better), ["t_depth/rmse", "absent/miou"])
    assert chosen == ["t_depth/rmse"]


def test_counts_fall_back_to_the_regime_when_the_data_cannot_tell():
    split = make_split("full", 6, ("a", "b"), seed=0)
    # an availability array that does not describe the split's images (2 rows, not 6)
    blind = SimpleNamespace(task_names=("a", "b"), available=np.ones((2, 2), dtype=bool))
    exp = SimpleNamespace(
        split=split, val_set=None,
        train_set=SimpleNamespace(dataset=Subset(blind, [0, 1, 2]), source=blind)
    )
    out = _split_counts(exp)
    assert out["split"] == {"a": 6, "b": 6}
    assert "does not match" in out["split_detail"]["note"]
    assert "counts are the regime's" in out["split_detail"]["note"]
    # With an availability array (and a validation carve) the counts follow it.
    available = np.array([[1, 0], [1, 1], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=bool)
    known = SimpleNamespace(task_names=("a", "b"), available=available, domain_ids=None,
                            domain_names=None)
    exp.train_set = SimpleNamespace(dataset=Subset(known, [0, 1, 2, 3]), source=known)
    exp.val_set = [4, 5]
    onelabel = Split(np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]), ("a", "b"))
    exp.split = onelabel
    out = _split_counts(exp)
    assert out["split"] == {"a": 1, "b": 2}  # rows (0, a), (1, b), (3, b)
    assert out["split_detail"]["labelled_by_regime"] == {"a": 3, "b": 3}
    assert out["split_detail"]["carved_for_validation"] == 2
    assert "per_source" not in out["split_detail"]
    assert label_availability(known, 5, ("a", "b")) is None  # wrong size: unknown
    assert label_availability(known, 6, ("b", "a")) is None  # other task order: unknown
