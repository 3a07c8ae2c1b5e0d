"""pseudo_label (Lee 2013, FixMatch's threshold): the term against a per-image loop, which
tasks get pseudo-labels, the tasks' confidence rules, and CLI training that resumes bitwise."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mtpsl.cli import main
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.methods import build_method
from mtpsl.tasks import build_task
from test_ssl import H, W, _batch, _model, dataset  # noqa: F401

from conftest import TINY_TRAIN, assert_same_state

LABELLED = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]],
                    dtype=bool)
THRESHOLD = 0.12


def _loop(batch, preds0, preds1, weight, threshold):
    """Per image: crop, resize and flip view0's probabilities by hand, keep confident pixels,
    NLL of view1 on them; only segmentation has a confidence here."""
    crop, flips = batch.views[1].meta["crop"], batch.views[1].meta["flip"]
    total, n_confident, n_pixels = 0.0, 0, 0
    k = batch.task_names.index("semantic")
    for i in range(len(batch)):
        if batch.labelled[i, k]:
            continue
        s, top, left = (float(v) for v in crop[i])
        h, w = int(H / s), int(W / s)
        p = preds0["semantic"][i].detach().exp()[:, int(top):int(top) + h, int(left):int(left) + w]
        p = F.interpolate(p[None], size=(H, W), mode="bilinear", align_corners=True)[0]
        if flips[i]:
            p = p.flip(-1)
        confidence, label = p.max(0)
        keep = confidence >= threshold
        n_confident, n_pixels = n_confident + int(keep.sum()), n_pixels + keep.numel()
        if keep.any():
            nll = -preds1["semantic"][i].permute(1, 2, 0)[keep].gather(1, label[keep][:, None])
            total = total + nll.mean()
    return weight * total / len(batch), n_confident, n_pixels


def _calibrated(model, image):
    """Eval mode with BatchNorm statistics of one pass (a fresh net's running statistics give
    near-uniform class probabilities: nothing would be confident)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(image)
    return model.eval()


def test_term_equals_a_per_image_loop_over_confident_pixels(dataset):  # noqa: F811
    batch = _batch(dataset, LABELLED, flip=True, seed=3)
    for view in batch.views:
        view.image = view.image.double()
    model = _calibrated(_model(dataset).double(), batch.views[0].image)
    method = build_method("pseudo_label", dataset.tasks, {"weight": 0.5,
                                                          "threshold": THRESHOLD})
    losses, _ = method.compute(model, batch)
    preds0 = model(batch.views[0].image).preds
    preds1 = model(batch.views[1].image).preds
    want, n_confident, n_pixels = _loop(batch, preds0, preds1, 0.5, THRESHOLD)
    assert 0 < n_confident < n_pixels  # the threshold really selects
    torch.testing.assert_close(losses.extra["pseudo_label"], want, rtol=1e-9, atol=0)
    strict = build_method("pseudo_label", dataset.tasks, {"threshold": 1.0})
    assert strict.compute(model, batch)[0].extra["pseudo_label"].item() == 0.0


def test_confidence_rules_of_the_tasks():
    seg = build_task("segmentation", "semantic", num_classes=3)
    probs = torch.tensor([[0.9, 0.5], [0.05, 0.3], [0.05, 0.2]]).view(1, 3, 1, 2)
    assert seg.pseudo_label(probs, 0.8).tolist() == [[[0, -1]]]
    sal = build_task("saliency", "saliency")
    p = torch.tensor([0.97, 0.5, 0.02]).view(1, 1, 1, 3)
    assert sal.pseudo_label(p, 0.95).tolist() == [[[[1.0, -1.0, 0.0]]]]
    assert build_task("depth", "depth").pseudo_label(torch.ones(1, 1, 2, 2), 0.5) is None
    assert build_task("normal", "normal").pseudo_label(torch.ones(1, 3, 2, 2), 0.5) is None


def test_trains_from_the_cli_and_resumes_bitwise(tmp_path):
    from mtpsl.data.synthetic import write_nyuv2_layout

    root = write_nyuv2_layout(tmp_path / "data", n_train=4, n_val=2, height=32, width=48,
                              progress=False)
    args = ["--config", "synthetic_demo", f"dataset.root={root}", "method.name=pseudo_label",
            "method.options.threshold=0.1", *TINY_TRAIN, "train.max_steps_per_epoch=2",
            "train.checkpoint_every=1", "train.device=cpu"]
    assert main(["train", "--run-dir", str(tmp_path / "full"), *args, "train.epochs=2"]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "part"), *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for section in ("model", "optim"):
        assert_same_state(full[section], part[section], section)
