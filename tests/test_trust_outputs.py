"""Issue 28, class 4: every file a command writes goes through the atomic write of checkpoints,
and a command that fails (here: a full disk, injected with MTPSL_FAULT=ENOSPC@write:<file>)
leaves the previous outputs intact: no truncated file, no mix of old and new, no temp file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtpsl.cli import main
from mtpsl.core import faults
from mtpsl.core.files import write_all

from conftest import TINY, train_cli


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full("report.csv")``: the next write of that file meets a full disk."""
    def plan(name: str) -> None:
        monkeypatch.setattr(faults, "_counts", {})
        monkeypatch.setenv(faults.ENV, f"ENOSPC@write:{name}#1")
    return plan


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_root) -> Path:
    return train_cli(tmp_path_factory.mktemp("outputs") / "run", tiny_root, *TINY,
                     "train.eval_every=1")


def test_several_files_are_written_all_or_none(tmp_path, disk_full):
    """core.files.write_all: every temp file before any rename."""
    a, b = tmp_path / "a.md", tmp_path / "b.csv"
    write_all({a: b"old a", b: b"old b"})
    disk_full("b.csv")
    with pytest.raises(OSError, match="No space left"):
        write_all({a: b"new a", b: b"new b"})
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md", "b.csv"]


def test_report_on_a_full_disk_keeps_the_previous_report(run, tmp_path, disk_full, capsys):
    """analysis.report.write_report (report.csv was cut to 4096 bytes, .md replaced)."""
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    (out / "report.md").write_text("the previous report\n")  # so that a new one would differ
    before = _snapshot(out)
    disk_full("report.csv")
    assert main(["report", str(run), "--out", str(out)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_figures_on_a_full_disk_keep_the_previous_png_and_pdf(run, tmp_path, disk_full):
    """analysis.figures.common.save (a good PNG was replaced by a truncated one)."""
    folder = tmp_path / "figs"
    assert main(["figures", "curves", "--runs", str(run), "--out", str(folder)]) == 0
    before = _snapshot(folder)
    assert {"curves.png", "curves.pdf"} <= set(before)
    disk_full("curves.pdf")
    assert main(["figures", "curves", "--runs", str(run), "--labels", "another",
                 "--out", str(folder)]) == 2
    assert _snapshot(folder) == before


def test_predict_on_a_full_disk_leaves_no_empty_file(run, tmp_path, disk_full):
    """core.render's png/npy writers (predict left 0-byte PNGs)."""
    image = tmp_path / "room.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(image)
    out = tmp_path / "pred"
    disk_full("room_depth.npy")
    assert main(["predict", "--run", str(run), str(image), "--out", str(out),
                 "--device", "cpu"]) == 2
    assert all(p.stat().st_size > 0 for p in out.iterdir())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_torchscript_export_on_a_full_disk_is_an_error_not_an_abort(run, tmp_path, disk_full,
                                                                    capsys):
    """inference.export._export_torchscript (torch's writer aborted the process: exit 134)."""
    path = tmp_path / "model.pt"
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out",
                 str(path)]) == 0
    before = path.read_bytes()
    disk_full("model.pt")
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out",
                 str(path)]) == 2
    assert "No space left" in capsys.readouterr().err and path.read_bytes() == before


def test_a_full_disk_at_the_first_checkpoint_names_the_file(tiny_root, tmp_path, disk_full,
                                                           capsys):
    """core.files.atomic_write: a full disk's OSError from write/fsync names no file (it said
    "error: No space left on device"); the error now names the file it could not write."""
    run = tmp_path / "run"
    disk_full("checkpoint.pt")
    assert main(["train", "--run-dir", str(run), f"dataset.root={tiny_root}", *TINY]) == 2
    assert f"error: {run / 'checkpoint.pt'}: No space left on device" in capsys.readouterr().err
