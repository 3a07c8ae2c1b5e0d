"""Rows of ``docs/fidelity.md`` added in issue 29 that no other module pins: SemiMTL's
supervised losses averaged per source dataset (Eq. 1 per dataset, summed in the generator's
objective, Eq. 8; ``method.options.supervised_mean=domain``) instead of over the whole mixed
batch, and xtask's direct depth loss against xtask_mt's unmasked NYUv2 script."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtpsl.data.batch import Batch, View
from mtpsl.methods import build_method
from mtpsl.methods.semimtl import berhu_per_image, task_losses
from mtpsl.models import ModelOutput
from mtpsl.tasks import build_task

TASKS = {
    "semantic": build_task("segmentation", "semantic", num_classes=5),
    "depth": build_task("depth", "depth"),
}
H, W = 32, 40  # the discriminator needs 32 pixels a side


def _batch(domain: list[int], seed: int = 0):
    """Source 0 labels segmentation, source 1 depth (the cross-city setting)."""
    g = torch.Generator().manual_seed(seed)
    b = len(domain)
    dom = torch.tensor(domain)
    labelled = torch.stack([dom == 0, dom == 1], dim=1)
    seg = torch.randint(0, 5, (b, H, W), generator=g)
    seg[:, :2] = -1
    depth = torch.rand(b, 1, H, W, generator=g, dtype=torch.float64) + 0.1
    depth[:, :, :, :3] = 0
    targets = {"semantic": torch.where(labelled[:, 0, None, None], seg, -1),
               "depth": torch.where(labelled[:, 1, None, None, None], depth, 0.0)}
    view = View(torch.zeros(b, 3, H, W, dtype=torch.float64), targets)
    preds = {"semantic": torch.log_softmax(torch.randn(b, 5, H, W, generator=g,
                                                       dtype=torch.float64), 1),
             "depth": torch.randn(b, 1, H, W, generator=g, dtype=torch.float64)}
    return Batch([view], labelled, torch.arange(b), tuple(TASKS), dom), preds


@pytest.mark.parametrize("domain", [[0, 0, 1, 1], [0, 1, 1, 1], [1, 0, 1, 0, 0]])
def test_domain_mean_averages_each_source_over_its_own_images(domain):
    batch, preds = _batch(domain)
    got = task_losses(TASKS, batch, preds, "berhu", mean="domain")
    whole = task_losses(TASKS, batch, preds, "berhu")
    dom = batch.domain
    seg = TASKS["semantic"].loss(preds["semantic"], batch.targets["semantic"])
    depth = berhu_per_image(preds["depth"], batch.targets["depth"],
                            TASKS["depth"].valid(batch.targets["depth"]))
    want = {"semantic": seg[dom == 0].mean(), "depth": depth[dom == 1].mean()}
    for name in TASKS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0.0)
        n_source = int((dom == (0 if name == "semantic" else 1)).sum())
        torch.testing.assert_close(whole[name], want[name] * n_source / len(dom))


class _Fixed(nn.Module):
    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, images):
        return ModelOutput({k: v + self.dummy for k, v in self.preds.items()}, {})


@pytest.mark.parametrize("name", ["jtl", "semisd", "semimtl"])
def test_the_option_reaches_every_method(name):
    batch, preds = _batch([0, 0, 1, 1])
    losses = {}
    for mean in ("batch", "domain"):
        method = build_method(name, TASKS, {"supervised_mean": mean, "disc_width": 0.125}
                              if name != "jtl" else {"supervised_mean": mean})
        method.attach(_Fixed(preds))
        method = method.double()
        losses[mean] = method.compute(_Fixed(preds), batch)[0].tasks
    for task in TASKS:  # two balanced sources: the per-source mean is twice the batch's
        torch.testing.assert_close(losses["domain"][task], 2 * losses["batch"][task])
    with pytest.raises(Exception, match=r"method\.options\.supervised_mean"):
        build_method(name, TASKS, {"supervised_mean": "image"})


def test_a_single_source_batch_is_the_same_either_way():
    batch, preds = _batch([0, 1, 0])
    single = Batch(batch.views, batch.labelled, batch.index, batch.task_names, None)
    assert task_losses(TASKS, single, preds, "l1", mean="domain") == task_losses(
        TASKS, single, preds, "l1")


# ----------------------------------------------------------------------------- xtask's NYUv2


def test_xtask_direct_depth_ignores_invalid_pixels_where_the_nyuv2_script_does_not():
    """Ledger row "Direct depth loss mask on NYUv2": xtask_mt's ``main_cross_nyu.py`` 36 passes
    no masks (``module.py`` 481-484: all ones), so its L1 also counts the zero-depth pixels;
    mtpsl averages over the valid pixels only (no option restores the script's)."""
    tasks = {"semantic": build_task("segmentation", "semantic", num_classes=5),
             "depth": build_task("depth", "depth")}
    method = build_method("xtask", tasks, {"transfer_width": 0.125})
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(2, 1, H, W, generator=g) + 0.1
    depth[:, :, :5] = 0.0
    pred = torch.randn(2, 1, H, W, generator=g)
    view = View(torch.zeros(2, 3, H, W), {"semantic": torch.full((2, H, W), -1),
                                          "depth": depth})
    batch = Batch([view], torch.tensor([[False, True], [False, True]]), torch.arange(2),
                  tuple(tasks))
    preds = {"semantic": torch.log_softmax(torch.randn(2, 5, H, W, generator=g), 1),
             "depth": pred}
    got = method.direct_terms(preds, batch)["direct/depth"]
    valid = depth[:, 0] != 0
    masked = torch.stack([(pred - depth)[i, 0][valid[i]].abs().mean() for i in range(2)]).mean()
    unmasked = (pred - depth).abs().flatten(1).mean(1).mean()
    torch.testing.assert_close(got, masked)
    assert not torch.isclose(got, unmasked)
