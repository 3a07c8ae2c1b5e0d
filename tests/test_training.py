"""End to end: `mtpsl train / eval / compare` on tiny data, run folders, exact resume."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from mtpsl.checkpoint import load_checkpoint
from mtpsl.cli import main
from mtpsl.splits import Split

from conftest import TINY_TRAIN, make_layout

TINY = ["model.width=0.0625", "train.epochs=2", "train.batch_size=2", "train.eval_every=1",
        "train.checkpoint_every=1", "train.progress=false", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("data"), n=6, h=32, w=48)


def _train(root, run_dir, *extra):
    code = main(["train", "--run-dir", str(run_dir), f"dataset.root={root}", *TINY, *extra])
    assert code == 0
    return json.loads((run_dir / "final_metrics.json").read_text())


@pytest.mark.parametrize("method", ["sl", "stl"])
def test_train_writes_a_complete_run_folder(tiny_root, tmp_path, method):
    final = _train(tiny_root, tmp_path / "run", f"method.name={method}")
    run = tmp_path / "run"
    for name in ["config.yaml", "split.json", "metrics.csv", "metrics.jsonl", "checkpoint.pt",
                 "final_metrics.json"]:
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert final["reported"] == "last epoch"
    assert final["metrics"] == {k[5:]: v for k, v in rows[-1].items() if k.startswith("eval/")}
    for key in ["semantic/miou", "depth/abs_err", "normal/mean"]:
        assert np.isfinite(final["metrics"][key])
    state = load_checkpoint(run / "checkpoint.pt")  # weights_only=True inside
    assert state["epoch"] == 2
    if method == "stl":
        assert set(state["model"]) >= {"nets.semantic.heads.semantic.1.weight"}


def test_split_file_of_a_run_reproduces_the_split(tiny_root, tmp_path):
    _train(tiny_root, tmp_path / "a", "labels.regime=random", "train.epochs=1")
    saved = Split.load(tmp_path / "a" / "split.json", ("semantic", "depth", "normal"))
    _train(tiny_root, tmp_path / "b", f"labels.file={tmp_path / 'a' / 'split.json'}",
           "train.epochs=1")
    again = Split.load(tmp_path / "b" / "split.json")
    np.testing.assert_array_equal(saved.labelled, again.labelled)
    _train(tiny_root, tmp_path / "c", "labels.regime=random", "train.epochs=1")
    redrawn = Split.load(tmp_path / "c" / "split.json")
    np.testing.assert_array_equal(saved.labelled, redrawn.labelled)


def test_same_seed_is_bitwise_reproducible_and_seed_matters(tiny_root, tmp_path):
    a = load_checkpoint(_train(tiny_root, tmp_path / "a") and tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(_train(tiny_root, tmp_path / "b") and tmp_path / "b" / "checkpoint.pt")
    c = load_checkpoint(_train(tiny_root, tmp_path / "c", "seed=1") and
                        tmp_path / "c" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_resume_matches_an_uninterrupted_run_bitwise(tiny_root, tmp_path):
    _train(tiny_root, tmp_path / "full", "train.epochs=3")
    _train(tiny_root, tmp_path / "part", "train.epochs=1")
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=3"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert part["epoch"] == 3
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    rows = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_resume_refuses_to_change_the_experiment(tiny_root, tmp_path, capsys):
    _train(tiny_root, tmp_path / "r", "train.epochs=1")
    assert main(["train", "--resume", str(tmp_path / "r"), "method.name=stl"]) == 2
    assert "only train.* overrides" in capsys.readouterr().err


def test_workers_do_not_change_the_result(tiny_root, tmp_path):
    _train(tiny_root, tmp_path / "w0", "train.epochs=1")
    _train(tiny_root, tmp_path / "w2", "train.epochs=1", "train.num_workers=2")
    a = load_checkpoint(tmp_path / "w0" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "w2" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_reproduces_final_metrics(tiny_root, tmp_path, capsys):
    final = _train(tiny_root, tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["metrics"] == pytest.approx(final["metrics"], rel=1e-6, nan_ok=True)


def test_validation_split_selects_a_labelled_best_epoch(tiny_root, tmp_path):
    final = _train(tiny_root, tmp_path / "run", "dataset.val_fraction=0.34", "train.epochs=2")
    best = final["best_epoch_on_validation_split"]
    assert best["selected_by"] == "val/semantic/miou" and best["epoch"] in (1, 2)
    assert final["reported"] == "last epoch"
    assert sum(final["split"].values()) >= 1


def test_compare_prints_a_table_with_delta_m(tiny_root, tmp_path, capsys):
    args = ["compare", "--config", "synthetic_demo", "--out", str(tmp_path / "grid"),
            "--methods", "stl,sl", "--regimes", "onelabel", "--seeds", "0,1",
            f"dataset.root={tiny_root}", *TINY, "train.epochs=1"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "semantic/miou ↑" in table and "depth/abs_err ↓" in table and "normal/mean ↓" in table
    main_table = table.split("Paired against")[0]
    lines = [line for line in main_table.splitlines() if line.startswith("| s")]
    assert [line.split("|")[1].strip() for line in lines] == ["stl", "sl"]
    assert lines[0].split("|")[-2].strip() == "0 (baseline)"
    assert " ± " in lines[1] and "[" in lines[1].split("|")[-2]  # 2 seeds: an interval
    assert "- sl vs stl: Δm " in table and "no conclusion (2 paired seeds, need 3)" in table
    assert (tmp_path / "grid" / "results.csv").is_file()
    assert (tmp_path / "grid" / "onelabel" / "sl" / "seed1" / "final_metrics.json").is_file()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", f"dataset.root={tmp_path / 'nowhere'}", "train.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err and "Traceback" not in err


@pytest.mark.slow
def test_full_size_nyuv2_preset_runs_an_iteration_on_cpu(tmp_path):
    from mtpsl.data.synthetic import write_nyuv2_layout
    from mtpsl.models import count_parameters

    root = write_nyuv2_layout(tmp_path / "syn", n_train=2, n_val=1, progress=False)
    final = _run_preset(root, tmp_path / "run")
    assert final["parameters"] + 3 == 25_055_188  # reference count includes 3 log-sigmas
    assert count_parameters  # imported for the reader: the same counter the run reports


def _run_preset(root, run_dir):
    code = main(["train", "--config", "nyuv2_onelabel", "--run-dir", str(run_dir),
                 f"dataset.root={root}", "train.epochs=1", "train.max_steps_per_epoch=1",
                 "train.progress=false", "train.eval_batch_size=1"])
    assert code == 0
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_runs_record_their_setup_signature_and_environment(tiny_root, tmp_path, capsys):
    """Seeds of one set-up share a signature; any setting that changes what is learned (a
    weighting, the model width) or the data gives another; where files go does not."""
    base = ["train.epochs=1"]
    runs = {
        "seed0": _train(tiny_root, tmp_path / "a", *base),
        "seed1": _train(tiny_root, tmp_path / "b", *base, "seed=1", f"output_dir={tmp_path}"),
        "dwa": _train(tiny_root, tmp_path / "c", *base, "method.weighting=dwa"),
        "wider": _train(tiny_root, tmp_path / "d", *base, "model.width=0.125"),
    }
    signature = {k: r["setup_signature"] for k, r in runs.items()}
    assert signature["seed0"] == signature["seed1"]
    assert len({signature["seed0"], signature["dwa"], signature["wider"]}) == 3
    assert runs["dwa"]["setup"]["method"]["weighting"] == "dwa"
    pairing = {k: r["pairing"] for k, r in runs.items()}
    assert pairing["seed0"] == pairing["dwa"]  # same seed: same split, same initial weights
    assert pairing["seed1"]["initial_weights"] != pairing["seed0"]["initial_weights"]
    assert pairing["seed1"]["split"] != pairing["seed0"]["split"]  # labels.seed follows seed
    env = runs["seed0"]["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["deterministic"] is True and env["device"] == "cpu"
    err = capsys.readouterr().err
    assert "epoch 1/1  loss " in err and "img/s  ETA" in err  # one line per epoch


def test_grids_of_two_weightings_and_two_models_report_separate_labelled_rows(
        tiny_root, tmp_path, capsys):
    """The issue's acceptance case on real tiny runs: sl under uniform and CAGrad, on SegNet
    and SegNet-MTAN, seeds 0-2 (one compare grid per model), reported together: four rows
    named by what differs, each with intervals and a paired verdict against the uniform run of
    its own model; a seed run twice in one set-up is an error naming both folders."""
    variants = ("compare.variants={uniform: {method: sl}, cagrad: {method: sl, weighting: "
                "cagrad}}")
    for model in ("segnet", "mtan"):
        args = ["compare", "--config", "synthetic_demo", "--out", str(tmp_path / model),
                "--methods", "uniform,cagrad", "--seeds", "0,1,2", "compare.baseline=uniform",
                "compare.contrasts=[]", variants, f"model.name={model}",
                f"dataset.root={tiny_root}", *TINY_TRAIN, "train.device=cpu"]
        assert main(args) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "segnet"), str(tmp_path / "mtan"), "--baseline",
                 "uniform", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "report.csv")))
    assert [(r["setup"], r["method"], r["seeds"]) for r in rows] == [
        ("segnet", "uniform", "3"), ("segnet", "cagrad", "3"),
        ("mtan", "uniform", "3"), ("mtan", "cagrad", "3")]
    for row in rows:
        low, high = float(row["semantic/miou:ci_low"]), float(row["semantic/miou:ci_high"])
        assert low <= float(row["semantic/miou"]) <= high
    assert all(r["verdict"] for r in rows if r["method"] == "cagrad")
    assert (out / "report.png").is_file()
    twin = tmp_path / "segnet-again"
    shutil.copytree(tmp_path / "segnet" / "onelabel" / "cagrad" / "seed1", twin)
    assert main(["report", str(tmp_path / "segnet"), str(twin)]) == 2
    err = capsys.readouterr().err
    assert "same seed 1" in err and str(twin) in err


def _state(run_dir):
    return {k: v.double() for k, v in load_checkpoint(run_dir / "checkpoint.pt")["model"].items()
            if v.is_floating_point()}


def _distance(a, b):
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_clip_norm_gives_a_hand_clipped_update(tiny_root, tmp_path):
    """One plain SGD step from the same weights and batch: clipping to c makes the update
    -lr * c * g / |g|, so two clipped runs lie lr * |c1 - c2| apart and on the unclipped
    update's line (|g|, the global norm over every parameter, is far above both c)."""
    one_step = ["optim.optimizer=sgd", "optim.momentum=0", "optim.lr=0.1", "train.epochs=1",
                "train.max_steps_per_epoch=1"]
    runs = {}
    for name, clip in (("none", None), ("c1", 1e-3), ("c2", 3e-3)):
        extra = [] if clip is None else [f"train.clip_norm={clip}"]
        _train(tiny_root, tmp_path / name, *one_step, *extra)
        runs[name] = _state(tmp_path / name)
    assert _distance(runs["c1"], runs["c2"]) == pytest.approx(0.1 * 2e-3, rel=1e-4)
    full = {k: runs["none"][k] - runs["c1"][k] for k in runs["c1"]}
    clipped = {k: runs["c1"][k] - runs["c2"][k] for k in runs["c1"]}
    dot = sum((full[k] * clipped[k]).sum() for k in full)
    norms = _distance(runs["none"], runs["c1"]) * _distance(runs["c1"], runs["c2"])
    assert float(dot) / norms == pytest.approx(-1.0, abs=1e-4)  # same line (float32 weights)
    assert main(["train", f"dataset.root={tiny_root}", "train.clip_norm=0"]) == 2


def test_methods_get_an_after_step_hook_after_every_optimiser_step(tiny_root, tmp_path,
                                                                  monkeypatch):
    """The hook runs once per step with the just-updated model (an EMA teacher's place)."""
    from mtpsl.methods import METHODS

    seen = []

    def after_step(self, model):
        seen.append(next(model.parameters()).detach().clone())

    monkeypatch.setattr(METHODS.get("sl"), "after_step", after_step)
    _train(tiny_root, tmp_path / "run", "train.max_steps_per_epoch=2")  # 2 epochs x 2 steps
    assert len(seen) == 4
    assert all(not torch.equal(seen[i], seen[i + 1]) for i in range(3))  # after each update
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert torch.equal(seen[-1], next(iter(final.values())))


def test_frozen_method_parameters_stay_out_of_the_optimiser():
    from mtpsl.methods import build_method
    from mtpsl.models import HeadSpec, build_model
    from mtpsl.tasks import build_task

    tasks = {"depth": build_task("depth", "depth")}
    model = build_model("segnet", {"depth": HeadSpec(1, tasks["depth"].activate)}, width=0.0625)
    method = build_method("sl", tasks, {})
    method.teacher = torch.nn.Linear(2, 2).requires_grad_(False)
    method.head = torch.nn.Linear(2, 2)
    (group,) = method.optimizer_groups(model)
    ids = {id(p) for p in group.params}
    assert all(id(p) in ids for p in method.head.parameters())
    assert not any(id(p) in ids for p in method.teacher.parameters())
    assert len(group.params) == len(list(model.parameters())) + 2
