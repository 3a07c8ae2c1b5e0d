"""The joint-space figure of a tiny trained xtc run (paper 001, Fig. 3): files, the cosine
values it is titled with against an independent computation, and its errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.analysis.figures import FIGURES, FigureRequest, common
from mtpsl.analysis.figures import joint as figures_joint
from mtpsl.cli import main
from mtpsl.core.errors import MtpslError
from mtpsl.engine.checkpoint import load_checkpoint, save_checkpoint
from mtpsl.inference.load import load_method, load_run
from mtpsl.methods.joint_space import JointSpaceMapper, pair_index
from mtpsl.models.segnet import scaled_filters

from conftest import PASCAL_TASKS, TINY, train_cli

H, W = 64, 96
INDICES = [0, 3]


@pytest.fixture(scope="module")
def xtc_run(tmp_path_factory, shared_layout):
    run = tmp_path_factory.mktemp("runs") / "xtc"
    return train_cli(run, shared_layout(n=4, h=H, w=W), "method.name=xtc", *TINY)


@pytest.fixture(scope="module")
def data(xtc_run):
    return figures_joint.collect_joint_space(xtc_run, "semantic,depth", INDICES, device="cpu")


def _independent_cosines(run, source, target, indices):
    """Mapper rebuilt from the checkpoint by hand, run per image in its batch-1 reference
    form, with inputs encoded and cosines computed in numpy."""
    state = load_checkpoint(run / "checkpoint.pt")
    prefix = "loss_fn.mapper."
    mapper_state = {k[len(prefix):]: v for k, v in state["method"].items()
                    if k.startswith(prefix)}
    channels = {"semantic": 13, "depth": 1, "normal": 3}
    mapper = JointSpaceMapper(channels, True, scaled_filters(0.0625))
    mapper.load_state_dict(mapper_state)
    loaded = load_run(run)
    root = loaded.config.dataset.root
    folders = {"semantic": "label", "depth": "depth", "normal": "normal"}
    pid = pair_index(list(channels).index(source), list(channels).index(target), 3)
    out = []
    for idx in indices:
        image = torch.from_numpy(np.load(f"{root}/val/image/{idx}.npy")).permute(2, 0, 1)
        with torch.no_grad():
            pred = loaded.model(image[None]).preds[source][0].numpy()
        assert source == "semantic" and target == "depth"
        x_s = np.eye(13, dtype=np.float32)[pred.argmax(0)].transpose(2, 0, 1)
        depth = np.load(f"{root}/val/{folders[target]}/{idx}.npy").transpose(2, 0, 1)
        x_t = depth / (depth.max() + 1e-12)
        with torch.no_grad():
            m_s = mapper.reference_forward(source, torch.from_numpy(x_s)[None], pid)[0].numpy()
            m_t = mapper.reference_forward(target, torch.from_numpy(x_t)[None], pid)[0].numpy()
        dot = (m_s * m_t).sum(0)
        norm = np.maximum(np.linalg.norm(m_s, axis=0) * np.linalg.norm(m_t, axis=0), 1e-8)
        out.append(float((dot / norm).mean()))
    return out


def test_titled_cosines_equal_an_independent_computation(xtc_run, data):
    expected = _independent_cosines(xtc_run, "semantic", "depth", INDICES)
    assert data.mean_cosine == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert data.pair_id == pair_index(0, 1, 3)
    titles = figures_joint.joint_space_titles(data)
    for row, value in zip(titles, data.mean_cosine, strict=True):
        assert len(row) == figures_joint.COLUMNS
        assert row[-1].endswith(f"mean {value:.3f}")
    # the figure's number is one minus the loss's pair term
    from mtpsl.methods.xtc import _cos_distance
    dist = _cos_distance(data.mapped_source, data.mapped_target)
    assert (1 - dist).tolist() == pytest.approx(data.mean_cosine, abs=1e-6)


def test_load_method_restores_the_trained_mapper(xtc_run):
    run = load_run(xtc_run)
    mapper = load_method(run).loss_fn.mapper
    state = load_checkpoint(xtc_run / "checkpoint.pt")["method"]
    for key, value in mapper.state_dict().items():
        assert torch.equal(value, state[f"loss_fn.mapper.{key}"]), key
    assert not mapper.training


def test_joint_pca_shares_one_scale():
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 2, 3)), rng.random((8, 2, 3)) + 1.0
    pa, pb = figures_joint.joint_pca(a, b)
    assert pa.shape == pb.shape == (2, 3, 3)
    both = np.concatenate([pa.reshape(-1, 3), pb.reshape(-1, 3)])
    assert np.allclose(both.min(0), 0) and np.allclose(both.max(0), 1)
    assert not np.allclose(pa.mean(), pb.mean())  # the offset between the maps is kept
    za, zb = figures_joint.joint_pca(np.zeros((4, 2, 2)), np.zeros((4, 2, 2)))
    assert not za.any() and not zb.any()


def test_cli_writes_png_and_pdf(xtc_run, tmp_path, capsys):
    out = tmp_path / "figs"
    code = main(["figures", "joint-space", "--runs", str(xtc_run), "--indices", *map(str, INDICES),
                 "--device", "cpu", "--out", str(out), "--pair", "normal,semantic"])
    assert code == 0
    png, pdf = out / "joint-space.png", out / "joint-space.pdf"
    assert png.stat().st_size > 0 and pdf.read_bytes().startswith(b"%PDF")
    with Image.open(png) as img:
        w, h = img.size
    assert w == round(figures_joint.COLUMNS * common.CELL_IN * common.DPI)
    # the rows, then the keys: both tasks' colours, the PCA's meaning, the cosine's bar
    data = figures_joint.collect_joint_space(xtc_run, "normal,semantic", INDICES, device="cpu")
    rows = [figures_joint._cells(data, k) for k in range(len(INDICES))]
    keys = figures_joint.joint_space_keys(data, rows)
    assert [(first, span) for first, span, _ in keys] == [(1, 1), (2, 1), (3, 2), (5, 1)]
    assert [k.normals for _, _, k in keys] == [True, False, False, False]
    assert keys[1][2].classes[-1][0] == "void / ignored" and keys[3][2].vmax == 1.0
    rows_in = len(INDICES) * (common.CELL_IN * H / W + common.TITLE_IN)
    assert h == round(common.grid_height(len(INDICES), (H, W), keys) * common.DPI)
    assert h > round(rows_in * common.DPI)
    assert f"wrote {png}" in capsys.readouterr().out


def test_non_xtc_run_is_refused(xtc_run, tmp_path, capsys):
    state = load_checkpoint(xtc_run / "checkpoint.pt")
    state["config"]["method"] = {**state["config"]["method"], "name": "sl", "options": {}}
    del state["method"]
    save_checkpoint(state, tmp_path / "sl" / "checkpoint.pt")
    code = main(["figures", "joint-space", "--runs", str(tmp_path / "sl"), "--indices", "0",
                 "--device", "cpu", "--out", str(tmp_path / "figs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "trained with method 'sl'" in err and "no joint task space" in err
    assert not (tmp_path / "figs").exists()


@pytest.mark.parametrize("pair, message", [
    ("semantic,colour", "unknown task 'colour'"),
    ("semantic", "give two task names"),
    ("depth,depth", "must differ"),
])
def test_bad_pair_lists_the_tasks(xtc_run, pair, message):
    with pytest.raises(MtpslError, match=message) as err:
        figures_joint.collect_joint_space(xtc_run, pair, [0], device="cpu")
    assert "semantic, depth, normal" in str(err.value)


def test_figure_function_takes_the_pair_from_the_request(xtc_run, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(figures_joint, "plot_joint_space",
                        lambda data, stem: seen.append((data.source, data.target, stem)) or [])
    req = FigureRequest(runs=[xtc_run, xtc_run], out=tmp_path, labels=["a", "b/c"],
                                indices=[1], device="cpu", options={"pair": "depth,normal"})
    FIGURES["joint-space"].make(req)
    assert seen == [("depth", "normal", tmp_path / "joint-space-a"),
                    ("depth", "normal", tmp_path / "joint-space-b_c")]
    data = figures_joint.collect_joint_space(xtc_run, None, [1], device="cpu")
    assert (data.source, data.target) == ("semantic", "depth")


def test_cli_pair_option_reaches_the_figure(xtc_run, tmp_path, capsys):
    code = main(["figures", "joint-space", "--runs", str(xtc_run), "--indices", "0",
                 "--device", "cpu", "--out", str(tmp_path), "--pair", "semantic,colour"])
    assert code == 2 and "unknown task 'colour'" in capsys.readouterr().err


# -- five tasks (PASCAL-Context layout) ------------------------------------------------------





def _encode(kind, array, is_label, channels):
    """Mapping-network input of one prediction / label, written out in numpy."""
    if kind == "SegmentationTask":
        ids = array if is_label else array.argmax(0)
        valid = (ids >= 0) & (ids < channels)
        return (np.eye(channels, dtype=np.float32)[np.where(valid, ids, 0)]
                * valid[..., None]).transpose(2, 0, 1)
    if kind == "NormalTask":
        return (array + 1.0) / 2.0
    if is_label:  # binary label: 0/1 kept, unlabelled (-1) -> 0
        return np.where((array == 0) | (array == 1), array, 0.0).astype(np.float32)
    return array


# Every task once as the source and once as the target, each kind of pair (segmentation,
# normals and binary tasks on either side); one full collection per pair is ~1 s on a CPU.
CYCLE = list(zip(PASCAL_TASKS, PASCAL_TASKS[1:] + PASCAL_TASKS[:1], strict=True))


def test_pair_ids_of_five_tasks_are_distinct():
    ids = [pair_index(PASCAL_TASKS.index(s), PASCAL_TASKS.index(t), 5)
           for s, t in itertools.permutations(PASCAL_TASKS, 2)]
    assert sorted(ids) == list(range(20))
    for s, t in itertools.permutations(PASCAL_TASKS, 2):
        assert figures_joint.parse_pair(f"{s},{t}", PASCAL_TASKS) == (s, t)


def test_cycle_of_pairs_of_five_tasks(pascal_xtc):
    run = load_run(pascal_xtc)
    assert list(run.tasks) == PASCAL_TASKS
    mapper = load_method(run).loss_fn.mapper
    for s, t in CYCLE:
        data = figures_joint.collect_joint_space(pascal_xtc, f"{s},{t}", [0, 1], device="cpu")
        pid = pair_index(PASCAL_TASKS.index(s), PASCAL_TASKS.index(t), 5)
        assert data.pair_id == pid
        for k in range(2):
            cells = figures_joint._cells(data, k)
            assert len(cells) == figures_joint.COLUMNS
            task_s, task_t = run.tasks[s], run.tasks[t]
            x_s = _encode(type(task_s).__name__, data.source_pred[k].numpy(), False,
                          task_s.out_channels)
            x_t = _encode(type(task_t).__name__, data.target_label[k].numpy(), True,
                          task_t.out_channels)
            with torch.no_grad():
                m_s = mapper.reference_forward(s, torch.from_numpy(x_s)[None], pid)[0].numpy()
                m_t = mapper.reference_forward(t, torch.from_numpy(x_t)[None], pid)[0].numpy()
            dot = (m_s * m_t).sum(0)
            norm = np.maximum(np.linalg.norm(m_s, axis=0) * np.linalg.norm(m_t, axis=0), 1e-8)
            assert data.mean_cosine[k] == pytest.approx(float((dot / norm).mean()),
                                                        rel=1e-4, abs=1e-5), (s, t, k)


def test_five_task_cli_figure_with_binary_tasks(pascal_xtc, tmp_path):
    assert main(["figures", "joint-space", "--runs", str(pascal_xtc), "--indices", "0",
                 "--device", "cpu", "--out", str(tmp_path), "--pair", "saliency,edges"]) == 0
    with Image.open(tmp_path / "joint-space.png") as img:
        assert img.size[0] == round(figures_joint.COLUMNS * common.CELL_IN * common.DPI)
    assert (tmp_path / "joint-space.pdf").read_bytes().startswith(b"%PDF")
    data = figures_joint.collect_joint_space(pascal_xtc, "edges,saliency", [1], device="cpu")
    pred_cell, label_cell = figures_joint._cells(data, 0)[1:3]
    np.testing.assert_array_equal(pred_cell[0], data.source_pred[0, 0].numpy())  # probability
    label = data.target_label[0, 0].numpy()
    np.testing.assert_array_equal(label_cell[0].mask, (label != 0) & (label != 1))
