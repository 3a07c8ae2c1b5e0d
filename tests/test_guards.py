"""Set-ups that run but are probably not what was meant get a warning at the start of a run
(mtpsl.engine.guards): evaluation on the training split, a task without labelled images, an
encoder started from random weights."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from mtpsl.cli import main
from mtpsl.core.config import load_config
from mtpsl.data.splits import Split
from mtpsl.engine.guards import model_takes_backbone, setup_warnings

from conftest import TINY_TRAIN

TASKS = ("semantic", "depth", "normal")


def _experiment(labelled: np.ndarray, *overrides: str, available: np.ndarray | None = None):
    """What setup_warnings reads of an Experiment: its config, split and training source."""
    config = load_config(None, list(overrides))
    source = SimpleNamespace(task_names=TASKS, available=np.ones_like(labelled)
                             if available is None else available)
    split = Split(labelled, TASKS, "onelabel")
    return SimpleNamespace(config=config, split=split,
                           train_set=SimpleNamespace(source=source))


def test_a_usual_setup_says_nothing():
    labelled = np.eye(3, dtype=bool)[[0, 1, 2, 0]]
    assert setup_warnings(_experiment(labelled)) == []


def test_evaluating_on_the_training_split_is_named():
    labelled = np.eye(3, dtype=bool)[[0, 1, 2]]
    [line] = setup_warnings(_experiment(labelled, "dataset.eval_split=train"))
    assert "dataset.train_split and dataset.eval_split are both 'train'" in line


def test_a_task_without_labels_is_named_counting_what_the_data_has():
    labelled = np.eye(3, dtype=bool)[[0, 0, 1, 1]]  # no image labelled for normals
    [line] = setup_warnings(_experiment(labelled))
    assert line.startswith("normal: no labelled training image") and "of 4 images" in line
    # the regime labels depth on two images, but the data has no depth file for them
    missing_depth = np.ones((4, 3), dtype=bool)
    missing_depth[:, 1] = False
    labelled = np.eye(3, dtype=bool)[[0, 1, 2, 1]]
    [line] = setup_warnings(_experiment(labelled, available=missing_depth))
    assert line.startswith("depth: no labelled training image")


def test_an_encoder_from_random_weights_is_named():
    labelled = np.eye(3, dtype=bool)[[0, 1, 2]]
    assert model_takes_backbone("resnet") and model_takes_backbone("dense")
    assert not model_takes_backbone("segnet") and not model_takes_backbone("nope")
    [line] = setup_warnings(_experiment(labelled, "model.name=resnet"))
    assert line.startswith("model.backbone.weights is not set") and "'resnet'" in line
    assert setup_warnings(_experiment(labelled, "model.name=resnet", "model.backbone.weights=w.pth",
                                      "model.backbone.normalize=imagenet")) == []
    # ImageNet weights fed unnormalised images; and the network a method brings is the one
    # judged (method.network), not model.name
    [line] = setup_warnings(_experiment(labelled, "model.name=resnet",
                                        "model.backbone.weights=w.pth"))
    assert line.startswith("model.backbone.weights is set but model.backbone.normalize is none")
    [line] = setup_warnings(_experiment(labelled, "method.network=dense"))
    assert line.startswith("model.backbone.weights is not set") and "'dense'" in line


def test_the_cli_prints_them_at_the_start_of_a_run(tiny_root, tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={tiny_root}",
                 *TINY_TRAIN, "dataset.eval_split=train"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: dataset.train_split and dataset.eval_split") == 1
    assert main(["train", "--resume", str(tmp_path / "r"), "train.epochs=2"]) == 0
    assert "warning: dataset.train_split" not in capsys.readouterr().err  # once per run
