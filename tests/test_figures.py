"""Figures of two tiny trained runs: curves, the qualitative grid (paper 001 Fig. 4), the CLI.

The two runs are the cells of one tiny `mtpsl compare` grid (stl and sl, 2 epochs, evaluated
every epoch), trained once for the module: that also covers compare's curves.png.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.analysis.figures import FIGURES, common, curves, qualitative
from mtpsl.cli import main
from mtpsl.core import render
from mtpsl.engine.checkpoint import load_checkpoint, save_checkpoint
from mtpsl.inference.load import load_run
from mtpsl.metrics import EdgeMetric
from mtpsl.tasks import binary

from conftest import TINY

H, W = 32, 48
ARGS = [*TINY, "train.epochs=2", "train.eval_every=1", "train.checkpoint_every=1",
        "optim.lr=1e-3", "train.eval_batch_size=4"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, shared_layout):
    root = shared_layout(n=4, h=H, w=W)
    out = tmp_path_factory.mktemp("grid")
    code = main(["compare", "--config", "synthetic_demo", "--out", str(out), "--methods",
                 "stl,sl", "--regimes", "onelabel", "--seeds", "0", f"dataset.root={root}",
                 *ARGS])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(grid):
    return [grid / "onelabel" / m / "seed0" for m in ("stl", "sl")]


def _size(path):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        return img.size


def test_compare_writes_curves_of_its_grid(grid):
    w, h = _size(grid / "curves.png")
    assert (grid / "curves.pdf").stat().st_size > 0
    assert (w, h) == (4 * common.PANEL_IN[0] * common.DPI, common.PANEL_IN[1] * common.DPI)


def test_plot_curves_one_panel_per_primary_metric_plus_loss(runs, tmp_path):
    histories = [common.read_history(r) for r in runs]
    assert curves.curve_panels(histories) == [
        "eval/semantic/miou", "eval/depth/abs_err", "eval/normal/mean", "train/total"]
    paths = curves.plot_curves(runs, tmp_path / "c", labels=["A", "B"])
    assert [p.name for p in paths] == ["c.png", "c.pdf"]
    w, h = _size(paths[0])
    assert w == 4 * common.PANEL_IN[0] * common.DPI and h == common.PANEL_IN[1] * common.DPI
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert common.default_labels(runs) == ["stl", "sl"]


def _independent_score(task_name, pred, target):
    """Per-image primary metrics written out in numpy (not via mtpsl.metrics)."""
    if task_name == "semantic":
        valid = target >= 0
        labels = pred.argmax(0)
        ious = []
        for c in range(pred.shape[0]):
            g, p = (target == c) & valid, (labels == c) & valid
            union = (g | p).sum()
            if union:
                ious.append((g & p).sum() / union)
        return float(np.mean(ious))
    if task_name == "depth":
        valid = target[..., 0] != 0
        return float(np.abs(pred[0] - target[..., 0])[valid].mean())
    valid = np.any(target != 0, axis=-1)
    p = pred.transpose(1, 2, 0)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    cos = np.clip((p * target).sum(-1), -1, 1)
    return float(np.degrees(np.arccos(cos))[valid].mean())


INDICES = [0, 3]
LABELS = ["STL", "SL"]


@pytest.fixture(scope="module")
def qual(runs):
    return qualitative.collect_qualitative(runs, INDICES, labels=LABELS, device="cpu")


def test_qualitative_scores_equal_an_independent_computation(runs, qual):
    table = qualitative.score_table(qual)
    assert len(table) == len(INDICES) * 3 * 2
    root = load_run(runs[0]).config.dataset.root
    folders = {"semantic": "label", "depth": "depth", "normal": "normal"}
    images = torch.stack([torch.from_numpy(np.load(f"{root}/val/image/{i}.npy")).permute(2, 0, 1)
                          for i in INDICES])
    titles = qualitative.cell_titles(qual)
    for run, label in zip(runs, LABELS, strict=True):
        with torch.no_grad():
            preds = load_run(run).model(images).preds
        for k, idx in enumerate(INDICES):
            for t, name in enumerate(folders):
                target = np.load(f"{root}/val/{folders[name]}/{idx}.npy")
                expected = _independent_score(name, preds[name][k].numpy(), target)
                got = next(r["score"] for r in table if r["index"] == idx and
                           r["task"] == name and r["run"] == label)
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-5), (label, idx, name)
                column = 1 + t * 3 + 1 + LABELS.index(label)
                assert titles[k][column].startswith(label)
                assert titles[k][column].endswith(f"{got:.3f}")


def test_qualitative_grid_is_sized_by_images_and_columns(qual, tmp_path):
    one = dataclasses.replace(
        qual, indices=qual.indices[:1], images=qual.images[:1],
        targets={n: t[:1] for n, t in qual.targets.items()},
        preds=[{n: t[:1] for n, t in p.items()} for p in qual.preds],
        scores={lab: {n: v[:1] for n, v in s.items()} for lab, s in qual.scores.items()})
    w2, h2 = _size(qualitative.plot_qualitative(qual, tmp_path / "two")[0])
    w1, h1 = _size(qualitative.plot_qualitative(one, tmp_path / "one")[0])
    cols = 1 + 3 * (1 + 2)  # RGB, then per task: ground truth + 2 runs
    row_in = common.CELL_IN * H / W + common.TITLE_IN
    assert w1 == w2 == round(cols * common.CELL_IN * common.DPI)
    # one more image is one more row; the keys below the rows take the same height in both
    assert abs((h2 - h1) - row_in * common.DPI) <= 1
    keys_px = h1 - row_in * common.DPI
    assert 0.5 * common.DPI < keys_px < 2.5 * common.DPI
    assert abs(h1 - qualitative.qualitative_size(one)[1] * common.DPI) <= 1
    assert w2 > h2 > h1
    assert (tmp_path / "two.pdf").read_bytes().startswith(b"%PDF")


def test_qualitative_keys_name_the_classes_and_one_depth_scale_holds_for_every_row(qual):
    from mtpsl.data.layout import NYUV2_CLASSES

    rows, keys = qualitative._grid(qual)
    assert [(first, span) for first, span, _ in keys] == [(1, 3), (4, 3), (7, 3)]
    semantic, depth, normal = (k for _, _, k in keys)
    assert [n for n, _ in semantic.classes] == [f"{c} {name}" for c, name in
                                                enumerate(NYUV2_CLASSES)] + ["void / ignored"]
    assert "(m)" in depth.title and normal.normals
    # the depth colour bar spans the valid labels and the predictions of both images
    labels = qual.targets["depth"].numpy()
    preds = np.stack([p["depth"].numpy() for p in qual.preds])
    values = np.concatenate([labels[labels != 0], preds.ravel()])
    assert (depth.vmin, depth.vmax) == pytest.approx((values.min(), values.max()), rel=1e-6)
    for row in rows:
        for _, kwargs in row[4:7]:
            assert (kwargs["vmin"], kwargs["vmax"]) == (depth.vmin, depth.vmax)


def test_qualitative_command(runs, tmp_path, capsys):
    args = ["figures", "qualitative", "--runs", *map(str, runs), "--labels", *LABELS,
            "--device", "cpu", "--indices", "0", "3", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "qualitative.png" in capsys.readouterr().out
    w, h = _size(tmp_path / "qualitative.png")
    assert w == round(10 * common.CELL_IN * common.DPI) and w > h
    assert (tmp_path / "qualitative.pdf").stat().st_size > 0


def test_curves_command_and_cli_errors(runs, tmp_path, capsys):
    assert main(["figures", "curves", "--runs", *map(str, runs), "--out", str(tmp_path)]) == 0
    assert _size(tmp_path / "curves.png")[0] > 0 and "curves.pdf" in capsys.readouterr().out
    base = ["figures", "qualitative", "--runs", *map(str, runs), "--device", "cpu",
            "--out", str(tmp_path)]
    cases = [
        ([*base, "--indices", "99"], "out of range"),
        ([*base, "--indices", "0", "--labels", "only-one"], "labels"),
        (["figures", "curves", "--runs", str(tmp_path / "nowhere")], "metrics.jsonl"),
        (["figures", "qualitative", "--runs", str(tmp_path / "nowhere"), "--indices", "0"],
         "checkpoint"),
    ]
    for args, words in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, err
    with pytest.raises(SystemExit):
        main(["figures", "qualitative", "--runs", str(runs[0])])  # --indices is required


def test_runs_with_different_task_sets_are_refused(runs, tmp_path, capsys):
    # The stl run restricted to two tasks: its normal network dropped from the checkpoint.
    state = load_checkpoint(runs[0] / "checkpoint.pt")
    state["config"]["dataset"]["tasks"] = state["task_names"] = ["semantic", "depth"]
    if "model_card" in state:  # the tasks are rebuilt from the card where there is one
        card = state["model_card"]
        card["tasks"] = [t for t in card["tasks"] if t["name"] != "normal"]
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("nets.normal")}
    two = tmp_path / "two-tasks"
    two.mkdir()
    save_checkpoint(state, two / "checkpoint.pt")
    assert list(load_run(two).tasks) == ["semantic", "depth"]
    args = ["figures", "qualitative", "--runs", str(runs[1]), str(two), "--indices", "0",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "one task set" in capsys.readouterr().err


def test_figures_registry_is_the_commands_extension_point():
    assert {"curves", "qualitative"} <= set(FIGURES)
    assert FIGURES["qualitative"].uses_images
    assert not FIGURES["curves"].uses_images


# -- five tasks (PASCAL-Context layout) ------------------------------------------------------





def _saliency_miou(prob, label):
    """The benchmark's saliency mIoU of one image (its own pixels; the padding cropped)."""
    import benchmark_reference as ref

    rows, cols = np.nonzero((label == 0) | (label == 1))
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    return ref.eval_sal([(prob[box], label[box])])["miou"]


def _edge_f(binary, label, max_dist=0.0075):
    """BSDS F of a thinned 0/1 edge map at the image's own size (padding cropped), by a
    brute-force maximum matching."""
    import benchmark_reference as ref

    rows, cols = np.nonzero((label == 0) | (label == 1))
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    pred, gt = binary[box] > 0, label[box] == 1
    matched = ref.max_matching(pred, gt, max_dist * np.hypot(*gt.shape))
    precision = matched / pred.sum() if pred.sum() else 0.0
    recall = matched / gt.sum() if gt.sum() else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_five_task_qualitative_cells_match_their_scores(pascal_run, tmp_path, capsys):
    data = qualitative.collect_qualitative([pascal_run], [0, 1], labels=["SL"], device="cpu")
    assert list(data.tasks) == ["semantic", "parts", "normal", "saliency", "edges"]
    names = list(data.tasks)
    for k in range(2):
        row = qualitative._panels(data, k)
        assert len(row) == 1 + 5 * 2
        cells = {name: row[1 + 2 * t: 3 + 2 * t] for t, name in enumerate(names)}
        # parts: the palette of its 7 classes, ignore black
        parts_gt = data.targets["parts"][k].numpy()
        np.testing.assert_array_equal(cells["parts"][0][0],
                                      render.colour_segmentation(parts_gt, 7))
        # saliency: label masked where unlabelled, prediction as the probability itself
        sal_gt = data.targets["saliency"][k].numpy()[0]
        (label_cell, scale), (pred_cell, _) = cells["saliency"]
        np.testing.assert_array_equal(label_cell.mask, (sal_gt != 0) & (sal_gt != 1))
        np.testing.assert_array_equal(label_cell.filled(-1), np.where(
            (sal_gt == 0) | (sal_gt == 1), sal_gt, -1))
        assert (scale["vmin"], scale["vmax"]) == (0.0, 1.0)
        prob = data.preds[0]["saliency"][k].numpy()[0]
        np.testing.assert_array_equal(pred_cell, prob)
        assert data.scores["SL"]["saliency"][k] == pytest.approx(
            _saliency_miou(prob, sal_gt), abs=1e-9)
        # edges: the thinned map shown scores the image's best sampled threshold (its oisF);
        # the titled odsF interpolates between thresholds, so it is at least that
        edge_gt = data.targets["edges"][k].numpy()[0]
        edge_bin = cells["edges"][1][0]
        assert set(np.unique(edge_bin)) <= {0.0, 1.0}
        metric = EdgeMetric()
        metric.update(data.preds[0]["edges"][k][None], data.targets["edges"][k][None])
        assert _edge_f(edge_bin, edge_gt) == pytest.approx(metric.compute()["oisf"], abs=1e-9)
        assert data.scores["SL"]["edges"][k] >= _edge_f(edge_bin, edge_gt) - 1e-12
    assert main(["figures", "qualitative", "--runs", str(pascal_run), "--indices", "0", "1",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    w, h = _size(tmp_path / "qualitative.png")
    assert w == round(11 * common.CELL_IN * common.DPI)
    rows_px = 2 * (common.CELL_IN * 32 / 48 + common.TITLE_IN) * common.DPI
    assert abs(h - qualitative.qualitative_size(data)[1] * common.DPI) <= 1 and h > rows_px


def test_edge_map_picks_the_threshold_that_recovers_the_edge():
    from mtpsl.tasks import build_task

    task = build_task("edge", "edges")
    label = torch.zeros(1, 20, 30)
    label[0, 10, 3:27] = 1  # one horizontal edge
    label[0, :, 28:] = -1  # an unlabelled strip
    prob = torch.full((1, 20, 30), 0.55)
    prob[0, 10, 3:27] = 0.8
    prob[0, ::4, ::5] = 0.3  # below the background: never shown alone
    shown = binary.edge_map(task, prob, label)
    expected = np.zeros((20, 30), np.float32)
    expected[10, 3:27] = 1
    np.testing.assert_array_equal(shown[:, :28], expected[:, :28])  # a 1-px line stays as is
    assert not shown[:, 28:].any()  # unlabelled pixels are no prediction either
    assert _edge_f(shown, label[0].numpy()) == 1.0


def test_edge_map_without_an_edge_to_find_thresholds_at_one_half():
    from mtpsl.tasks import build_task

    task = build_task("edge", "edges")
    prob = torch.linspace(0, 1, 24).reshape(1, 4, 6)
    from mtpsl.metrics.bsds import thin

    # no edge pixel: every threshold ties, the thinned map at 0.5 (in the PNG's 8 bits)
    shown = binary.edge_map(task, prob, torch.zeros((1, 4, 6)))
    levels = np.floor(prob[0].numpy() * 255) / 255
    np.testing.assert_array_equal(shown, thin((levels >= 0.5)[None])[0])
    # no labelled pixel: nothing to score, nothing shown
    assert not binary.edge_map(task, prob, torch.full((1, 4, 6), -1.0)).any()


def test_curves_of_many_set_ups_keep_their_panels(tmp_path):
    """A grid of 69 set-ups (synthetic_weightings): the legend goes below the panels in rows of
    its own (it used to fill the first panel until constrained layout collapsed the axes),
    and the lines stay distinct beyond matplotlib's ten colours."""
    import warnings

    from PIL import Image

    from mtpsl.analysis.figures.curves import line_style, plot_curve_groups

    def groups(n: int) -> dict:
        out = {}
        for g in range(n):
            run = tmp_path / f"n{n}" / f"g{g}"
            run.mkdir(parents=True)
            rows = [{"epoch": e, "train/total": 2.0 - 0.1 * e - 0.01 * g,
                     "eval/semantic/miou": 0.1 + 0.01 * e + 0.001 * g} for e in (1, 2)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            out[f"onelabel/sl+weighting{g:02d}"] = [run]
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied ..." fails the test
        few = plot_curve_groups(groups(3), tmp_path / "few")[0]
        many = plot_curve_groups(groups(69), tmp_path / "many")[0]
    assert Image.open(many).size[1] > Image.open(few).size[1]  # rows for the legend
    styles = {(str(line_style(n, 69)[0]), line_style(n, 69)[1]) for n in range(69)}
    assert len(styles) == 69
