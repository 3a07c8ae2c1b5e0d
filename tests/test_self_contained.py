"""Self-contained checkpoints: a trained run predicts, exports and evaluates on another folder
after its training data is gone (the tasks come from the checkpoint's model card); checkpoints
without a card still load from their data, and a malformed card is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.cli import main
from mtpsl.core.palette import VOID, default_class_colours
from mtpsl.data.layout import NYUV2_CLASSES
from mtpsl.data.pascal import PASCAL_TASKS, pascal_tasks
from mtpsl.engine.card import CARD_KEY, CARD_VERSION, task_entry, tasks_from_card
from mtpsl.engine.checkpoint import load_checkpoint, save_checkpoint
from mtpsl.inference.load import load_run
from mtpsl.tasks import TASKS, build_task

TRAIN = ["--config", "synthetic_demo", "train.epochs=1", "train.batch_size=4", "train.amp=off",
         "model.width=0.25", "train.progress=false", "train.channels_last=false"]


def _synth(out: Path, seed: int) -> Path:
    assert main(["data", "synth", "--out", str(out), "--n-train", "8", "--n-val", "4",
                 "--height", "32", "--width", "48", "--seed", str(seed)]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A run whose training folder has been moved away, the moved folder, another folder of
    the same layout, and a photo."""
    base = tmp_path_factory.mktemp("self_contained")
    data = _synth(base / "data", seed=0)
    run = base / "run"
    assert main(["train", *TRAIN, f"dataset.root={data}", "--run-dir", str(run)]) == 0
    moved = data.rename(base / "data-moved")
    other = _synth(base / "other", seed=1)
    photo = base / "photo.png"
    Image.fromarray((np.load(other / "val/image/0.npy") * 255).astype(np.uint8)).save(photo)
    return {"run": run, "moved": moved, "other": other, "photo": photo}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and err.count("\n") == 1, err
    return err


def _rewrite(run: Path, dest: Path, change) -> Path:
    """A copy of ``run`` whose checkpoint is ``change(state)``, saved with a valid digest (so
    the card's own checks, not the checksum, must find what is wrong)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    state = load_checkpoint(dest / "checkpoint.pt")
    state.pop("format")
    state.pop("sha256")
    save_checkpoint(change(state), dest / "checkpoint.pt")
    return dest


def test_the_card_records_tasks_classes_and_input(trained):
    state = torch.load(trained["run"] / "checkpoint.pt", weights_only=True)
    card = state[CARD_KEY]
    assert [t["name"] for t in card["tasks"]] == state["task_names"] == [
        "semantic", "depth", "normal"]
    semantic, depth, normal = card["tasks"]
    assert semantic["kind"] == "segmentation" and semantic["out_channels"] == 13
    assert semantic["params"] == {"loss_weight": 1.0, "num_classes": 13,
                                  "absent_class": "skip"}
    assert semantic["class_names"] == list(NYUV2_CLASSES)
    assert semantic["colours"] == default_class_colours(13).tolist()  # predict's PNG colours
    assert VOID not in [tuple(c) for c in semantic["colours"]]
    assert (depth["kind"], depth["class_names"], depth["colours"]) == ("depth", None, None)
    assert normal["kind"] == "normal" and normal["params"]["loss_kind"] == "cosine"
    assert card["input"] == {"size": [32, 48], "channels": 3, "dtype": "float32",
                             "range": [0.0, 1.0], "mean": [0.0, 0.0, 0.0],
                             "std": [1.0, 1.0, 1.0]}
    json.dumps(card)  # plain values only


def test_every_task_type_round_trips_through_a_card(tmp_path):
    tasks = {**pascal_tasks(PASCAL_TASKS, {"parts": 3}, edge_measure="dilation", edge_workers=2),
             "depth": build_task("depth", "depth", loss_weight=0.5),
             "keypoints": build_task("heatmap", "keypoints", num_keypoints=4, pck_radius=0.1)}
    for kind in TASKS.names():  # a task type added later too, with its contract options
        tasks[f"any-{kind}"] = build_task(kind, f"any-{kind}", **TASKS.get(kind).contract_options)
    card = {"version": CARD_VERSION, "tasks": [task_entry(t) for t in tasks.values()]}
    rebuilt = tasks_from_card(json.loads(json.dumps(card)), tmp_path / "checkpoint.pt")
    assert rebuilt == tasks and list(rebuilt) == list(tasks)


def test_predict_export_and_eval_elsewhere_without_the_training_data(trained, tmp_path,
                                                                      capsys):
    run = str(trained["run"])
    assert not (trained["moved"].parent / "data").exists()
    loaded = load_run(run)
    assert list(loaded.tasks) == ["semantic", "depth", "normal"]
    assert loaded.input_size == (32, 48) and loaded.card is not None

    out = tmp_path / "pred"
    assert main(["predict", "--run", run, str(trained["photo"]), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert {"photo_semantic.png", "photo_depth.npy", "photo_normal.npy"} <= {
        p.name for p in out.iterdir()}

    model = tmp_path / "m.torchscript.pt"
    assert main(["export", "--run", run, "--format", "torchscript", "--out", str(model)]) == 0
    meta = json.loads(Path(f"{model}.json").read_text())
    assert meta["input_size"] == [32, 48]
    assert meta["tasks"][0]["class_names"] == list(NYUV2_CLASSES)
    capsys.readouterr()

    for flag in ("--data", "--root"):  # --root: the old name, kept
        assert main(["eval", "--json", "--run", run, flag, str(trained["other"]),
                     "--device", "cpu"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["root"] == str(trained["other"]) and result["split"] == "val"
        assert "semantic/miou" in result["metrics"]


def test_a_pretrained_backbone_file_is_not_needed_either(tmp_path):
    """The checkpoint's weights replace the file a backbone was initialised from."""
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    data, run = _synth(tmp_path / "data", seed=0), tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"dataset.root={data}", "model.name=resnet",
                 "model.backbone.depth=18", f"model.backbone.weights={weights}",
                 "model.backbone.output_stride=32", "model.width=0.0625", "train.epochs=1",
                 "train.batch_size=4", "train.max_steps_per_epoch=1",
                 "train.progress=false"]) == 0
    weights.unlink()
    shutil.rmtree(data)
    loaded = load_run(run)
    assert loaded.config.model.backbone.weights == str(weights)  # as trained, for the record
    assert main(["export", "--run", str(run), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 0


def test_eval_on_a_folder_without_the_models_tasks_is_refused(trained, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(trained["other"], other)
    shutil.rmtree(other / "val" / "normal")
    assert main(["eval", "--run", str(trained["run"]), "--data", str(other),
                 "--device", "cpu"]) == 2
    assert "normal" in _error(capsys)


def test_a_checkpoint_without_a_card_loads_from_its_data_or_says_how(trained, tmp_path,
                                                                     capsys):
    old = _rewrite(trained["run"], tmp_path / "old",
                   lambda s: {k: v for k, v in s.items() if k != CARD_KEY})
    photo, out = str(trained["photo"]), str(tmp_path / "pred")
    predict = ["predict", "--run", str(old), photo, "--out", out, "--device", "cpu"]
    assert main(predict) == 2  # its training folder is gone
    err = _error(capsys)
    assert str(old / "checkpoint.pt") in err and CARD_KEY in err and "--data" in err
    assert main(["export", "--run", str(old), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert CARD_KEY in _error(capsys)

    assert main([*predict, "--data", str(trained["moved"])]) == 0  # a copy of the layout
    loaded = load_run(old, root=str(trained["moved"]))
    assert loaded.card is None and loaded.input_size == (32, 48)
    assert loaded.tasks == load_run(trained["run"]).tasks


def _set(path: str, value):
    """A change that sets ``model_card.<path>`` (dots and list indices) to ``value``."""
    def change(state):
        target = state[CARD_KEY]
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return state
    return change


BAD_CARDS = {
    "not a dict": (lambda s: {**s, CARD_KEY: ["semantic"]}, "is a list"),
    "unknown kind": (_set("tasks.0.kind", "hologram"), "'hologram' is not registered"),
    "missing kind": (lambda s: _set("tasks.1", {"name": "depth", "params": {}})(s),
                     "lacks 'kind'"),
    "bad params": (_set("tasks.0.params.num_classes", "13"), "params.num_classes"),
    "unknown param": (_set("tasks.0.params.colour", 3), "do not build"),
    "wrong channels": (_set("tasks.0.out_channels", 7), "out_channels"),
    "short colours": (_set("tasks.0.colours", [[0, 0, 0]]), "colours"),
    "bad input size": (_set("input.size", [32]), "input.size"),
    "other tasks": (_set("tasks.2.name", "surface"), "task_names"),
    "version": (_set("version", 99), "version 99"),
}


@pytest.mark.parametrize("case", list(BAD_CARDS))
def test_a_malformed_card_is_refused_naming_the_file_and_entry(trained, tmp_path, capsys,
                                                               case):
    change, expect = BAD_CARDS[case]
    bad = _rewrite(trained["run"], tmp_path / "bad", change)
    assert main(["predict", "--run", str(bad), str(trained["photo"]), "--out",
                 str(tmp_path / "pred"), "--device", "cpu"]) == 2
    err = _error(capsys)
    assert str(bad / "checkpoint.pt") in err and CARD_KEY in err and expect in err, err
