"""The keypoint-heatmap task, added as one file (``mtpsl/tasks/heatmap.py``): its loss and
metric against independent numpy computations, and training, prediction and the qualitative
figure from the CLI on a layout dataset that carries a folder of heatmap labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mtpsl.cli import main
from mtpsl.metrics import METRICS
from mtpsl.tasks import build_task
from mtpsl.tasks.heatmap import peaks

from conftest import TINY, final_metrics, make_layout, train_cli

K, H, W = 3, 32, 48


def _bumps(rng, n, sigma=2.0):
    """n label arrays (H, W, K): a Gaussian per keypoint; keypoint 2 is invisible (all 0)."""
    yy, xx = np.mgrid[0:H, 0:W]
    out, centres = [], []
    for _ in range(n):
        cy, cx = rng.integers(2, H - 2, K), rng.integers(2, W - 2, K)
        maps = np.exp(-((yy[..., None] - cy) ** 2 + (xx[..., None] - cx) ** 2) / (2 * sigma**2))
        maps[..., 2] = 0.0
        out.append(maps.astype(np.float32))
        centres.append(np.stack([cy, cx], 1))
    return out, centres


def test_loss_is_the_masked_per_image_mse():
    task = build_task("heatmap", "kp", num_keypoints=K)
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((2, K, 4, 5)).astype(np.float32))
    target[0, :, :2] = -1.0  # unlabelled pixels of image 0
    target[1] = -1.0  # image 1 entirely unlabelled
    pred = torch.from_numpy(rng.random((2, K, 4, 5)).astype(np.float32))
    loss = task.loss(pred, target)
    t, p = target.numpy(), pred.numpy()
    valid = (t[0] >= 0).all(0)
    expected0 = ((p[0] - t[0]) ** 2).sum(0)[valid].mean()
    np.testing.assert_allclose(loss.numpy(), [expected0, 0.0], rtol=1e-6)


def test_metric_equals_a_brute_force_count():
    rng = np.random.default_rng(1)
    labels, centres = _bumps(rng, 4)
    target = torch.from_numpy(np.stack(labels).transpose(0, 3, 1, 2).copy())
    pred = torch.rand(4, K, H, W, generator=torch.Generator().manual_seed(2)) * 0.1
    moves = rng.integers(-4, 5, (4, K, 2))
    for i in range(4):
        for k in range(K):
            y, x = np.clip(centres[i][k] + moves[i, k], 0, [H - 1, W - 1])
            pred[i, k, y, x] = 1.0
    metric = METRICS.get("keypoints")(pck_radius=0.05)
    metric.update(pred, target)
    got = metric.compute()
    dists = []
    for i in range(4):
        for k in range(2):  # keypoint 2 is invisible
            y, x = np.clip(centres[i][k] + moves[i, k], 0, [H - 1, W - 1])
            dists.append(math.dist((y, x), centres[i][k]))
    dists = np.array(dists)
    assert got["dist"] == pytest.approx(dists.mean(), rel=1e-9)
    assert got["pck"] == pytest.approx(100 * (dists <= 0.05 * math.hypot(H, W)).mean())


def test_peaks_are_the_first_maxima():
    maps = np.zeros((4, 5, 2), np.float32)
    maps[1, 3, 0] = 0.9
    maps[2, 0, 1] = 0.7
    maps[3, 4, 1] = 0.7  # a tie: the first in row-major order wins
    np.testing.assert_allclose(peaks(maps), [[1, 3, 0.9], [2, 0, 0.7]], rtol=1e-6)


@pytest.fixture(scope="module")
def heatmap_root(tmp_path_factory):
    root = make_layout(tmp_path_factory.mktemp("kp"), n=6, h=H, w=W)
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        folder = root / split / "kp"
        folder.mkdir()
        labels, _ = _bumps(rng, 6)
        for i, label in enumerate(labels):
            if split == "train" and i == 5:
                continue  # partially annotated: image 5 has no heatmap file
            np.save(folder / f"{i}.npy", label)
    return root


EXTRA = "dataset.options={extra_tasks: {kp: {type: heatmap, num_keypoints: 3}}}"
ARGS = [*TINY, "train.eval_every=1", "optim.lr=1e-3"]


def test_trains_predicts_and_draws_from_the_cli(heatmap_root, tmp_path):
    run = train_cli(tmp_path / "run", heatmap_root, EXTRA, "dataset.tasks=[semantic, kp]", *ARGS)
    final = final_metrics(run)
    assert {"kp/pck", "kp/dist", "semantic/miou"} <= set(final["metrics"])
    assert final["split_detail"]["labelled_by_regime"]["kp"] >= 1
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(image)
    out = tmp_path / "pred"
    assert main(["predict", "--run", str(run), "--out", str(out), "--device", "cpu",
                 str(image)]) == 0
    heat = np.load(out / "photo_kp.npy")
    assert heat.shape == (20, 30, K) and (heat >= 0).all() and (heat <= 1).all()
    assert np.load(out / "photo_kp_peaks.npy").shape == (K, 3)
    assert Image.open(out / "photo_kp.png").size == (30, 20)
    figs = tmp_path / "figs"
    assert main(["figures", "qualitative", "--runs", str(run), "--indices", "0", "1",
                 "--device", "cpu", "--out", str(figs)]) == 0
    assert (figs / "qualitative.png").is_file()


def test_a_bad_extra_task_names_the_key(heatmap_root, tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={heatmap_root}",
                 "dataset.options={extra_tasks: {kp: {type: heatmapp}}}", *ARGS])
    assert code == 2
    err = capsys.readouterr().err
    assert "dataset.options.extra_tasks.kp.type" in err and "heatmap" in err
