"""The top-level Python API: the README's example runs as written, ``import mtpsl`` is cheap,
and the command line accepts overrides anywhere and says where a run went."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mtpsl
from mtpsl.cli import main
from mtpsl.core.errors import DataError
from mtpsl.data.synthetic import write_nyuv2_layout

from conftest import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_nyuv2_layout("data/synth", n_train=16, n_val=8, height=32, width=48, progress=False)
    pixels = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save("room.png")
    example = readme_example()
    # the preset's width and precision, made small and machine-independent for the test
    example = example.replace('"train.epochs=1"]', '"train.epochs=1", "model.width=0.0625", '
                              '"train.amp=off", "train.progress=false"]')
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("(40, 56) ") and "'depth', 'normal', 'semantic'" in printed[-1]
    assert printed[0].endswith("runs/sl")
    assert (tmp_path / "runs/sl/final_metrics.json").exists()


def test_predict_takes_arrays_of_either_range_alike(tiny_trained):
    run = mtpsl.load_run(tiny_trained)
    pixels = (np.random.default_rng(1).random((20, 30, 3)) * 255).astype(np.uint8)
    as_bytes, as_floats = run.predict(pixels), run.predict(pixels / 255.0)
    for task in run.tasks:
        np.testing.assert_allclose(as_bytes[task], as_floats[task], atol=1e-5)
        assert as_bytes[task].shape[:2] == (20, 30)
    assert len(run.predict_many([pixels, pixels[:10]])) == 2
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        run.predict(pixels * 2.0)
    with pytest.raises(DataError, match=r"\(H, W, 3\)"):
        run.predict(pixels[..., 0])


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory, tiny_root) -> Path:
    run = tmp_path_factory.mktemp("api") / "run"
    assert main(["train", "--run-dir", str(run), f"dataset.root={tiny_root}", *TINY_TRAIN]) == 0
    return run


def test_overrides_go_anywhere_and_the_run_folder_is_named(tiny_root, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", f"dataset.root={tiny_root}", "--run-dir", str(run), *TINY_TRAIN]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"run folder: {run}" in captured.err and f"wrote {run}:" in captured.err
    assert json.loads(captured.out)["run_dir"] == str(run)
    assert "run_dir" not in json.loads((run / "final_metrics.json").read_text())
    with pytest.raises(SystemExit):  # anything else stays argparse's error
        main(["train", "--run-dir", str(tmp_path / "other"), "--no-such-option"])


def test_import_is_cheap_and_names_resolve_on_use():
    code = ("import sys, mtpsl; assert 'torch' not in sys.modules; "
            "print(mtpsl.__version__, len(mtpsl.METHODS.names()) > 5, "
            "mtpsl.train.__module__, 'load_run' in dir(mtpsl))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [mtpsl.__version__, "True", "mtpsl.engine.run", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = mtpsl.nope


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mtpsl {mtpsl.__version__}"
