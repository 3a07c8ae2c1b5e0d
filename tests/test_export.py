"""`mtpsl export`: ONNX (run by onnxruntime) and TorchScript files match the PyTorch model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from mtpsl.cli import main
from mtpsl.inference.export import ExportWrapper, ScatterUnpool2d, exportable, load_torchscript
from mtpsl.inference.load import load_run

from conftest import PASCAL_TASKS, TINY, train_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_root):
    base = tmp_path_factory.mktemp("export")
    return {method: train_cli(base / f"run-{method}", tiny_root, *TINY, "train.eval_every=1",
                              f"method.name={method}")
            for method in ("sl", "stl")}


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


@pytest.mark.parametrize("opset", [17, 18])
def test_onnx_takes_other_sizes_where_the_model_does(runs, tmp_path, opset):
    """SegNet takes any multiple of 32: the ONNX file's height and width are dynamic, checked
    at export; here at two sizes other than the training size (32x48)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(runs["sl"]), "--out", str(out),
                 "--opset", str(opset)]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())["input"]
    assert meta["dynamic_size"] is True and meta["shape"] == ["batch", 3, "height", "width"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for seed, (h, w) in enumerate([(64, 64), (96, 160)]):
        x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
        _, ref = _reference(runs["sl"], x)
        for g, r in zip(session.run(None, {"image": x.numpy()}), ref, strict=True):
            assert g.shape[-2:] == (h, w)
            np.testing.assert_allclose(g, r, atol=1e-4)


def test_a_model_bound_to_its_size_is_exported_at_it(runs, tmp_path, monkeypatch):
    """A graph that fails at the second size (here: a wrapper that reshapes to the training
    size) is exported at the training size, and the metadata says why."""
    pytest.importorskip("onnxruntime")
    from mtpsl.inference import export

    class FixedSize(ExportWrapper):
        def forward(self, images):
            return tuple(t.reshape(t.shape[0], t.shape[1], 32, 48) for t in super().forward(
                images))

    monkeypatch.setattr(export, "ExportWrapper", FixedSize)
    assert main(["export", "--run", str(runs["sl"]), "--out", str(tmp_path / "m.onnx")]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())["input"]
    assert meta["dynamic_size"] is False and meta["shape"] == ["batch", 3, 32, 48]
    assert meta["note"].startswith("fixed at the training size: at other sizes the model fails")


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere" in err


# ----------------------------------------------------------------------------- five tasks





def _check_activation(activation, out):
    """The output really is what its metadata says (checked in numpy, per definition)."""
    if activation == "log_softmax":
        np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, atol=1e-4)
        assert (out <= 1e-6).all()
    elif activation == "sigmoid":
        assert out.shape[1] == 1 and ((out >= 0) & (out <= 1)).all()
    elif activation == "l2_normalize":
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    else:
        raise AssertionError(f"unexpected activation {activation!r}")


def test_five_task_metadata_names_every_activation(pascal_run, tmp_path):
    assert main(["export", "--run", str(pascal_run), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 0
    _, meta = load_torchscript(tmp_path / "m.pt")
    assert json.loads((tmp_path / "m.pt.json").read_text())["tasks"] == meta["tasks"]
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert list(tasks) == PASCAL_TASKS
    assert {n: (t["kind"], t["channels"], t["activation"]) for n, t in tasks.items()} == {
        "semantic": ("segmentation", 21, "log_softmax"),
        "parts": ("segmentation", 7, "log_softmax"),
        "normal": ("normal", 3, "l2_normalize"),
        "saliency": ("saliency", 1, "sigmoid"),
        "edges": ("edge", 1, "sigmoid"),
    }
    plain = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    _, ref = _reference(pascal_run, x)
    with torch.no_grad():
        got = plain(x)
    assert len(got) == 5
    for g, r, task in zip(got, ref, meta["tasks"], strict=True):
        np.testing.assert_allclose(g.numpy(), r, atol=1e-4)
        _check_activation(task["activation"], g.numpy())


def test_five_task_onnx_matches_eager(pascal_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(pascal_run), "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == PASCAL_TASKS
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    _, ref = _reference(pascal_run, x)
    got = session.run(None, {"image": x.numpy()})
    for g, r, task in zip(got, ref, meta["tasks"], strict=True):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4)
        _check_activation(task["activation"], g)


def test_activation_name_probes_the_task():
    from dataclasses import dataclass

    from mtpsl.inference.export import activation_name
    from mtpsl.tasks import DepthTask, build_task

    assert activation_name(build_task("depth", "d")) == "identity"
    assert activation_name(build_task("edge", "e")) == "sigmoid"

    @dataclass(frozen=True)
    class SquaredDepth(DepthTask):  # an activation the metadata has no name for
        def activate(self, raw):
            return raw * raw

    assert activation_name(SquaredDepth(name="sq")) == "custom"


def test_onnx_failure_is_one_line_without_the_exporters_graph_dump(runs, tmp_path, capfd,
                                                                     monkeypatch):
    """The TorchScript-based exporter prints its whole graph to fd 1 when it fails."""
    pytest.importorskip("onnx")

    def failing_export(*args, **kwargs):
        os.write(1, b"Torch IR graph at exception: graph(...)\n")
        raise RuntimeError("Unsupported: ONNX export of operator adaptive_avg_pool2d\nmore")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    assert main(["export", "--run", str(runs["sl"]), "--out", str(tmp_path / "m.onnx")]) == 2
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err
    assert err.count("\n") == 1 and "adaptive_avg_pool2d" in err and "--opset 18" in err
    assert not list(tmp_path.iterdir())
    print("still printing")  # fd 1 is restored afterwards
    assert capfd.readouterr().out == "still printing\n"
