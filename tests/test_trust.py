"""Run folders, resume checks, checkpoint verification, non-finite refusal, the CLI's error
boundary, images as people have them, file permissions. Each test names what it guards."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.cli import app as cli
from mtpsl.cli import main
from mtpsl.core.errors import strip_worker_traceback
from mtpsl.core.rundir import RunLock
from mtpsl.engine.checkpoint import load_checkpoint, save_checkpoint
from mtpsl.inference.load import read_image

from conftest import TINY, copy_run, make_layout, train_cli, without_startup

ARGS = [*TINY, "train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1",
        "train.device=cpu", "train.eval_batch_size=4"]
RUN_FILES = ["checkpoint.pt", "config.yaml", "final_metrics.json", "metrics.csv",
             "metrics.jsonl", "split.json"]


@pytest.fixture(scope="module")
def root(shared_layout) -> Path:
    """Read-only: the tests that change data change a copy."""
    return shared_layout(n=6, h=32, w=32)


@pytest.fixture(scope="module")
def run(root, tmp_path_factory) -> Path:
    return train_cli(tmp_path_factory.mktemp("run") / "run", root, *ARGS)


def _error(capsys) -> str:
    err = without_startup(capsys.readouterr().err)  # when the error comes during training
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# -- 1. a run folder belongs to one run (guards rundir.claim_new and RunLock) --------------

def test_a_new_run_refuses_a_folder_holding_a_run(root, run, tmp_path, capsys):
    folder = copy_run(run, tmp_path / "copy")
    before = {n: (folder / n).read_bytes() for n in RUN_FILES}
    assert main(["train", "--run-dir", str(folder), f"dataset.root={root}", *ARGS]) == 2
    err = _error(capsys)
    assert "already holds a run" in err and f"--resume {folder}" in err
    assert {n: (folder / n).read_bytes() for n in RUN_FILES} == before


def test_a_locked_run_folder_is_refused_to_train_resume_and_eval_out(root, run, tmp_path,
                                                                     capsys):
    folder = copy_run(run, tmp_path / "copy")
    lock = RunLock(folder).acquire()  # what a second process sees while one trains
    try:
        assert main(["train", "--resume", str(folder)]) == 2
        assert "in use by another mtpsl process" in _error(capsys)
        assert main(["eval", "--run", str(folder), "--out", str(folder / "e.json"),
                     "--device", "cpu"]) == 2
        assert "in use" in _error(capsys)
        empty = tmp_path / "empty"
        empty.mkdir()
        other = RunLock(empty).acquire()
        assert main(["train", "--run-dir", str(empty), f"dataset.root={root}", *ARGS]) == 2
        assert "in use" in _error(capsys)
        other.release()
    finally:
        lock.release()


def test_the_lock_is_held_across_processes(run, tmp_path):
    folder = copy_run(run, tmp_path / "copy")
    with RunLock(folder):
        code = ("import sys; from mtpsl.core.rundir import RunLock\n"
                f"RunLock({str(folder)!r}).acquire()")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode != 0 and "in use by another mtpsl process" in done.stderr
    RunLock(folder).acquire().release()  # free again once released


@pytest.mark.parametrize("given", [False, True], ids=["fresh folder", "--run-dir"])
def test_a_run_failing_set_up_leaves_no_folder(root, tmp_path, capsys, given):
    out = tmp_path / "runs"
    folder = out / "mine"
    args = ["--run-dir", str(folder)] if given else []
    assert main(["train", *args, f"dataset.root={root}", f"output_dir={out}", "name=mine",
                 *ARGS, "train.batch_size=64"]) == 2
    assert "larger than the training set" in _error(capsys)
    assert not folder.exists()


# -- 2. resume verifies what it resumes (guards train.resume / _resumed_config) ------------

def test_resume_refuses_a_replaced_split(run, tmp_path, capsys):
    folder = copy_run(run, tmp_path / "copy")
    split = json.loads((folder / "split.json").read_text())
    split["labelled"][0] = [1 - v for v in split["labelled"][0]]
    (folder / "split.json").write_text(json.dumps(split))
    assert main(["train", "--resume", str(folder), "train.epochs=3"]) == 2
    assert "split.json differs" in _error(capsys)


def test_resume_refuses_an_edited_config_naming_the_key(run, tmp_path, capsys):
    folder = copy_run(run, tmp_path / "copy")
    text = (folder / "config.yaml").read_text().replace("lr: 0.0001", "lr: 0.01")
    (folder / "config.yaml").write_text(text)
    assert main(["train", "--resume", str(folder), "train.epochs=3"]) == 2
    assert "at optim.lr" in _error(capsys)


def test_resume_refuses_changed_data(root, run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    folder = copy_run(run, tmp_path / "copy")
    state = load_checkpoint(folder / "checkpoint.pt")
    state["config"]["dataset"]["root"] = str(data)
    save_checkpoint(state, folder / "checkpoint.pt")
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace(
        str(root), str(data)))
    label = data / "train" / "depth" / "3.npy"
    np.save(label, np.load(label)[:, :, :1].astype(np.float64))  # same shape, other bytes
    assert main(["train", "--resume", str(folder), "train.epochs=3"]) == 2
    assert "dataset (train split) differs" in _error(capsys)


def test_resume_refuses_fewer_epochs_than_done(run, tmp_path, capsys):
    folder = copy_run(run, tmp_path / "copy")
    assert main(["train", "--resume", str(folder), "train.epochs=1"]) == 2
    assert "below the 2 epochs" in _error(capsys)


def test_a_corrupt_metrics_file_is_named(run, tmp_path, capsys):
    folder = copy_run(run, tmp_path / "copy")
    with open(folder / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert main(["train", "--resume", str(folder), "train.epochs=3"]) == 2
    assert "metrics.jsonl: line 3" in _error(capsys)


# -- 3. a checkpoint is verified before it is used (guards checkpoint.load_checkpoint) -----

def _flip_tensor_bytes(path: Path) -> None:
    """Flip bytes inside the largest stored tensor (inside the zip's data records)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len  # the local header's lengths
    for k in range(64):  # uncompressed (torch stores tensors STORED): bytes of the weights
        data[start + info.file_size // 2 + k] ^= 0xFF
    path.write_bytes(bytes(data))


def _bad_checkpoints(run: Path, tmp_path: Path) -> dict[str, Path]:
    state = load_checkpoint(run / "checkpoint.pt")
    cases = {}

    def case(name, write):
        folder = copy_run(run, tmp_path / name.replace(" ", "-"))
        write(folder / "checkpoint.pt")
        cases[name] = folder

    case("flipped bytes", _flip_tensor_bytes)
    case("a list", lambda p: torch.save([1, 2], p))
    case("missing keys", lambda p: save_checkpoint({"epoch": 1}, p))
    wrong = {**state, "model": {k: v[..., :1] if v.ndim == 4 else v
                                for k, v in state["model"].items()}}
    case("wrong shapes", lambda p: save_checkpoint(wrong, p))
    nan = {**state, "model": {k: v * float("nan") if v.is_floating_point() else v
                              for k, v in state["model"].items()}}
    case("non-finite weights", lambda p: save_checkpoint(nan, p))
    return cases


EXPECT = {"flipped bytes": "checksum mismatch", "a list": "holds a list",
          "missing keys": "checkpoint lacks", "wrong shapes": "does not fit this model",
          "non-finite weights": "non-finite values"}


def test_bad_checkpoints_are_one_line_errors_everywhere(run, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    for name, folder in _bad_checkpoints(run, tmp_path).items():
        commands = {
            "eval": ["eval", "--run", str(folder), "--device", "cpu"],
            "predict": ["predict", "--run", str(folder), str(image), "--out",
                        str(tmp_path / "pred"), "--device", "cpu"],
            "export": ["export", "--run", str(folder), "--format", "torchscript",
                       "--out", str(tmp_path / "m.pt")],
            "resume": ["train", "--resume", str(folder), "train.epochs=3"],
        }
        for command, args in commands.items():
            if name == "non-finite weights" and command == "resume":
                continue  # resuming from NaN weights is caught by the training checks
            assert main(args) == 2, (name, command)
            err = _error(capsys)
            assert str(folder / "checkpoint.pt") in err and EXPECT[name] in err, (name, err)


# -- 4. no non-finite result is saved or served (guards train._require_finite_weights) -----

def test_non_finite_hyperparameters_are_config_errors(capsys):
    for override, key in [("optim.lr=.inf", "optim.lr"), ("optim.momentum=.nan", "optim.momentum"),
                          ("method.options={con_weight: .inf}", "method.options.con_weight")]:
        assert main(["train", override]) == 2
        assert key in capsys.readouterr().err


def test_an_lr_beyond_float32_is_a_config_error(capsys):
    assert main(["train", "optim.lr=1e39"]) == 2
    assert "optim.lr: Input should be less than" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["segnet", "mtan", "stl"])
def test_images_smaller_than_the_encoder_reduction_are_named(tmp_path, capsys, model):
    small = make_layout(tmp_path / "small", n=4, h=16, w=48)
    method = ["method.name=stl"] if model == "stl" else [f"model.name={model}"]
    assert main(["train", "--run-dir", str(tmp_path / "run"), f"dataset.root={small}", *ARGS,
                 *method]) == 2
    err = _error(capsys)
    assert "reduces images 32x" in err and "16x48" in err and "at least 32 pixels" in err
    assert not (tmp_path / "run").exists()


def test_an_update_to_non_finite_weights_is_never_checkpointed(root, tmp_path, capsys,
                                                               monkeypatch):
    folder = tmp_path / "run"
    # one step per epoch: the update of an epoch's last step is the one the loss/gradient
    # check cannot see. An update that overflows float32 while the loss and the gradients
    # stay finite (SGD's weight decay times an lr of 1e38) is simulated: such an lr is a
    # config error now (optim.lr <= 10, tests/test_trust_inputs.py)
    sgd_step = torch.optim.SGD.step

    def overflowing(self, *args, **kwargs):
        out = sgd_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing)
    assert main(["train", "--run-dir", str(folder), f"dataset.root={root}", *ARGS,
                 "optim.optimizer=sgd", "optim.momentum=0",
                 "train.max_steps_per_epoch=1"]) == 2
    assert "made weights non-finite" in _error(capsys)
    assert not (folder / "checkpoint.pt").exists()


# -- 5. one error boundary (guards cli.main) ------------------------------------------------

def test_config_files_that_are_not_yaml_configs(tmp_path, capsys):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    nested = tmp_path / "nested.yaml"
    nested.write_text("a: " + "[" * 20000)
    for path, expect in [(binary, "not UTF-8"), (nested, "nested too deeply"),
                         (tmp_path, "is a folder")]:
        assert main(["train", "--config", str(path)]) == 2
        assert expect in _error(capsys)


def test_os_errors_are_one_line(run, tmp_path, capsys):
    target = tmp_path / "a-folder"
    target.mkdir()
    assert main(["eval", "--run", str(run), "--device", "cpu", "--out", str(target)]) == 2
    assert str(target) in _error(capsys)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", "--run-dir", str(a_file), *ARGS]) == 2
    assert "is a file" in _error(capsys)


def test_a_data_error_in_a_loader_worker_names_the_file(root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    label = data / "train" / "depth" / "1.npy"
    array = np.load(label)
    array[0, 0, 0] = np.nan
    np.save(label, array)
    assert main(["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={data}", *ARGS,
                 "train.num_workers=1"]) == 2
    err = _error(capsys)
    assert str(label) in err and "DataLoader worker" not in err and len(err.splitlines()) == 1


def test_strip_worker_traceback_keeps_the_original_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most "
               "recent call last):\n  File \"x.py\", line 1, in f\n    g()\n"
               "mtpsl.core.errors.DataError: /data/1.npy: NaN in depth\n")
    assert strip_worker_traceback(wrapped) == "/data/1.npy: NaN in depth"
    assert strip_worker_traceback("plain message") == "plain message"


def test_a_bug_keeps_its_traceback_marked_internal(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_presets", broken)
    assert main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "internal error" in err


def test_a_config_typo_fails_before_torch_is_imported():
    code = ("import sys\nfrom mtpsl.cli import main\nrc = main(['train', 'train.epoch=3'])\n"
            "print(rc, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "train.epoch: unknown key" in done.stderr


# -- 7. inputs read as people have them (guards inference.read_image) ---------------------

def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    image = read_image(tmp_path / "g16.png")
    assert image.shape == (48, 64, 3)
    np.testing.assert_allclose(image[..., 0], ramp / 65535.0, atol=1e-6)
    assert (image == 1.0).mean() < 0.01


def test_exif_orientation_palette_cmyk_and_alpha(tmp_path):
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # a red top-left pixel
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "rot.png", exif=exif)
    shown = read_image(tmp_path / "rot.png")
    assert shown.shape == (6, 4, 3) and shown[0, -1, 0] > 0.8  # top-left moved to top-right
    img.convert("P").save(tmp_path / "p.png")
    np.testing.assert_allclose(read_image(tmp_path / "p.png"), rgb / 255.0, atol=1e-6)
    img.convert("CMYK").save(tmp_path / "c.jpg")
    assert read_image(tmp_path / "c.jpg").shape == (4, 6, 3)
    Image.fromarray(np.dstack([rgb, np.full((4, 6), 7, np.uint8)])).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), rgb / 255.0, atol=1e-6)


def test_data_check_reports_missing_labels_per_task(tmp_path, capsys):
    root = make_layout(tmp_path, n=4)
    (root / "train" / "normal" / "2.npy").unlink()
    assert main(["data", "check", "--root", str(root), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "normal: 3 of 4 images labelled, 1 without a label file" in out
    assert "depth: 4 of 4 images labelled\n" in out
    assert "the standard nyuv2 release has 795 train images, this folder 4" in out


# -- 8. one permission for every file of a run folder (guards files.atomic_write) ---------

def test_run_files_share_the_ordinary_permissions(run):
    mask = os.umask(0)
    os.umask(mask)
    modes = {n: stat.S_IMODE((run / n).stat().st_mode) for n in RUN_FILES}
    assert set(modes.values()) == {0o666 & ~mask}, modes
