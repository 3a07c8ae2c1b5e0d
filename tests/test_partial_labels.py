"""Partial labels in a batch: hidden targets, the labelled mask, and Eq. 1 of paper 001."""

from __future__ import annotations

import numpy as np
import torch

from mtpsl.data import DATASETS, PartialLabelSet
from mtpsl.data.batch import collate
from mtpsl.data.splits import make_split
from mtpsl.data.transforms import build_train_transform
from mtpsl.methods import METHODS, build_method, supervised_losses
from mtpsl.models import HeadSpec, build_model

from conftest import make_layout


def _data(tmp_path, n=6):
    ds = DATASETS.get("nyuv2")(make_layout(tmp_path, n=n, h=32, w=32), "train")
    split = make_split("onelabel", n, ds.task_names, seed=0)
    return ds, split


def test_unlabelled_targets_are_blank_and_mask_matches_split(tmp_path):
    ds, split = _data(tmp_path)
    items = PartialLabelSet(ds, ds.tasks, split.labelled)
    batch = collate([items[i] for i in range(len(ds))], ds.task_names)
    assert torch.equal(batch.labelled, torch.as_tensor(split.labelled))
    for k, (name, task) in enumerate(ds.tasks.items()):
        for i in range(len(ds)):
            valid = task.valid(batch.targets[name][i : i + 1])
            if split.labelled[i, k]:
                assert torch.equal(batch.targets[name][i], ds[i][name])
            else:
                assert not valid.any(), (name, i)


def test_missing_files_are_never_labelled(tmp_path):
    ds, _ = _data(tmp_path, n=4)
    (ds.root / "train" / "normal" / "2.npy").unlink()
    ds = DATASETS.get("nyuv2")(ds.root, "train")
    item = PartialLabelSet(ds, ds.tasks, np.ones((4, 3), bool))[2]
    assert item["labelled"].tolist() == [True, True, False]


def test_two_views_second_is_a_crop_of_the_first_and_seeded_by_epoch(tmp_path):
    ds, split = _data(tmp_path)
    transform = build_train_transform((1.5,), flip=False)
    items = PartialLabelSet(ds, ds.tasks, split.labelled, transform, n_views=2, seed=5)
    a, b = items[0], items[0]
    assert torch.equal(a["views"][1].image, b["views"][1].image)  # same (seed, epoch, index)
    assert not torch.equal(a["views"][0].image, a["views"][1].image)
    items.set_epoch(1)
    assert not torch.equal(items[0]["views"][0].image, a["views"][0].image)


def _reference_supervised_loss(preds, batch, tasks):
    """Per-image form of Eq. 1 with plain loops: mean over images of labelled-task losses."""
    total = 0.0
    for i in range(len(batch)):
        for k, name in enumerate(tasks):
            if not batch.labelled[i, k]:
                continue
            pred, target = preds[name][i], batch.targets[name][i]
            if name == "semantic":
                valid = target >= 0
                logp = pred.permute(1, 2, 0)[valid]
                loss = -logp[torch.arange(len(logp)), target[valid]].mean()
            elif name == "depth":
                valid = target[0] != 0
                loss = (pred[0][valid] - target[0][valid]).abs().mean()
            else:
                valid = target.abs().sum(0) != 0
                loss = 1 - (pred * target).sum(0)[valid].mean()
            total = total + loss
    return total / len(batch)


def test_supervised_loss_equals_per_image_reference(tmp_path):
    ds, split = _data(tmp_path)
    items = PartialLabelSet(ds, ds.tasks, split.labelled)
    batch = collate([items[i] for i in range(len(ds))], ds.task_names)
    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in ds.tasks.items()}
    torch.manual_seed(0)
    model = build_model("segnet", heads, width=0.0625)
    preds = model(batch.image).preds
    ours = sum(supervised_losses(ds.tasks, batch, preds).values())
    ref = _reference_supervised_loss(preds, batch, ds.tasks)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours, list(model.parameters()), retain_graph=True)
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_unlabelled_task_gets_no_gradient(tmp_path):
    ds, _ = _data(tmp_path, n=2)
    labelled = np.array([[True, False, False], [True, False, False]])
    batch = collate([PartialLabelSet(ds, ds.tasks, labelled)[i] for i in range(2)], ds.task_names)
    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in ds.tasks.items()}
    model = build_model("segnet", heads, width=0.0625)
    method = build_method("sl", ds.tasks, {})
    losses, _ = method.compute(model, batch)
    sum(losses.tasks.values()).backward()
    assert model.heads["depth"][1].weight.grad.abs().sum() == 0
    assert model.heads["semantic"][1].weight.grad.abs().sum() > 0


def test_stl_asks_for_separate_networks():
    assert METHODS.get("stl").per_task_networks and not METHODS.get("sl").per_task_networks
