"""`mtpsl export`: ONNX (run by onnxruntime) and TorchScript files match the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mtpsl.cli import main
from mtpsl.export import ExportWrapper, ScatterUnpool2d, exportable, load_torchscript
from mtpsl.inference import load_run

from conftest import make_layout

TINY = ["model.width=0.0625", "train.epochs=1", "train.batch_size=2", "train.progress=false",
        "train.eval_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    root = make_layout(base, n=4, h=32, w=48)
    out = {}
    for method in ("sl", "stl"):
        run_dir = base / f"run-{method}"
        assert main(["train", "--run-dir", str(run_dir), f"dataset.root={root}", *TINY,
                     f"method.name={method}"]) == 0
        out[method] = run_dir
    return out


def _reference(run_dir, x):
    loaded = load_run(run_dir)
    with torch.no_grad():
        preds = loaded.model(x).preds
    return loaded, [preds[name].numpy() for name in loaded.tasks]


def test_scatter_unpool_equals_max_unpool():
    pool = nn.MaxPool2d(2, 2, return_indices=True)
    x = torch.randn(2, 3, 13, 22)
    y, idx = pool(x)
    expected = nn.MaxUnpool2d(2, 2)(y, idx, output_size=x.shape[-2:])
    assert torch.equal(ScatterUnpool2d(2, 2)(y, idx, output_size=x.shape[-2:]), expected)
    y, idx = pool(torch.randn(1, 2, 8, 6))
    assert torch.equal(ScatterUnpool2d(2, 2)(y, idx), nn.MaxUnpool2d(2, 2)(y, idx))


def test_exportable_model_is_numerically_identical(runs):
    loaded = load_run(runs["sl"])
    names = list(loaded.tasks)
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        ref = loaded.model(x).preds
        got = ExportWrapper(exportable(loaded.model), names)(x)
    assert not any(isinstance(m, nn.MaxUnpool2d)
                   for m in exportable(loaded.model).modules())
    assert any(isinstance(m, nn.MaxUnpool2d) for m in loaded.model.modules())  # untouched
    for name, pred in zip(names, got, strict=True):
        assert torch.equal(pred, ref[name])


@pytest.mark.parametrize("method", ["sl", "stl"])
def test_onnx_export_runs_in_onnxruntime(runs, tmp_path, method, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(runs[method]), "--format", "onnx",
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "m.onnx.json").read_text())
    assert [t["name"] for t in sidecar["tasks"]] == ["semantic", "depth", "normal"]
    assert [t["channels"] for t in sidecar["tasks"]] == [13, 1, 3]
    assert sidecar["input_size"] == [32, 48]
    model = onnx.load(str(out))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["mtpsl"])["input_size"] == [32, 48]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["semantic", "depth", "normal"]
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {"image": x.numpy()})
    _, ref = _reference(runs[method], x)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4)


@pytest.mark.parametrize("method", ["sl", "stl"])
def test_torchscript_export_matches(runs, tmp_path, method):
    assert main(["export", "--run", str(runs[method]), "--format", "torchscript"]) == 0
    path = runs[method] / "model.torchscript.pt"
    assert path.is_file() and (runs[method] / "model.torchscript.pt.json").is_file()
    _, meta = load_torchscript(path)
    assert [t["name"] for t in meta["tasks"]] == ["semantic", "depth", "normal"]
    plain = torch.jit.load(str(path))  # no mtpsl needed to run it
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(2))  # other batch
    _, ref = _reference(runs[method], x)
    with torch.no_grad():
        got = plain(x)
    assert isinstance(got, tuple) and len(got) == 3
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-4)


def test_onnx_opset_18_uses_the_torch_export_based_exporter(runs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m18.onnx"
    assert main(["export", "--run", str(runs["sl"]), "--out", str(out), "--opset", "18"]) == 0
    model = onnx.load(str(out))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    _, ref = _reference(runs["sl"], x)
    for g, r in zip(session.run(None, {"image": x.numpy()}), ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err
