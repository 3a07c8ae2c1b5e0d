"""TaskTransferNet (seed 003): the xtask_net model, the xtask method's losses and options, and
the CLI end to end with every registered loss-weighting strategy."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtpsl.checkpoint import load_checkpoint
from mtpsl.cli import main
from mtpsl.config import BackboneConfig, load_config
from mtpsl.data.batch import Batch, View
from mtpsl.errors import ConfigError
from mtpsl.methods import build_method
from mtpsl.methods.xtask import (
    TransferNet,
    depth_pixel_loss,
    masked_ssim_loss,
    transferred_seg_loss,
)
from mtpsl.models import MODELS, HeadSpec, ModelOutput, build_model, shared_parameters
from mtpsl.tasks import build_task

from conftest import make_layout

C = 5
TASKS = {
    "semantic": build_task("segmentation", "semantic", num_classes=C),
    "depth": build_task("depth", "depth"),
}
HEADS = {n: HeadSpec(t.out_channels, t.activate) for n, t in TASKS.items()}
TINY = {"transfer_width": 0.125}


def _batch(b: int = 2, h: int = 16, w: int = 24, labelled=None, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(-1, C, (b, h, w), generator=g)
    depth = torch.rand(b, 1, h, w, generator=g) + 0.1
    depth[torch.rand(b, 1, h, w, generator=g) < 0.2] = 0.0
    lab = torch.ones(b, 2, dtype=torch.bool) if labelled is None else torch.tensor(labelled)
    seg = torch.where(lab[:, 0, None, None], seg, -1)  # hidden labels, as PartialLabelSet does
    depth = torch.where(lab[:, 1, None, None, None], depth, 0.0)
    image = torch.rand(b, 3, h, w, generator=g)
    return Batch(
        [View(image, {"semantic": seg, "depth": depth})],
        lab,
        torch.arange(b),
        ("semantic", "depth"),
    )


class FixedPreds(nn.Module):
    """A stand-in model returning given (leaf) predictions, to inspect gradients."""

    def __init__(self, seg: torch.Tensor, depth: torch.Tensor) -> None:
        super().__init__()
        self.seg, self.depth = seg, depth

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return ModelOutput({"semantic": F.log_softmax(self.seg, 1), "depth": self.depth})


def _leaf_preds(b: int = 2, h: int = 16, w: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seg = torch.randn(b, C, h, w, generator=g).requires_grad_()
    depth = (torch.rand(b, 1, h, w, generator=g) + 0.1).requires_grad_()
    return seg, depth


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("xtask_net", HEADS, width=0.0625, backbone=BackboneConfig(depth=18))


# ------------------------------------------------------------------------------- model


@pytest.mark.parametrize("depth, channels", [(18, 512), (50, 2048)])
def test_encoder_depths_build_and_expose_the_encoder(depth, channels):
    net = MODELS.get("xtask_net")(HEADS, width=0.0625, backbone=BackboneConfig(depth=depth))
    out = net(torch.rand(2, 3, 21, 30))  # sides not multiples of 32
    assert out.preds["semantic"].shape == (2, C, 21, 30)
    assert out.preds["depth"].shape == (2, 1, 21, 30)
    assert torch.allclose(out.preds["semantic"].exp().sum(1), torch.ones(2, 21, 30), atol=1e-5)
    assert net.encoder_info.channels == channels == out.features["encoder"].shape[1]
    assert out.features["encoder"].shape[-2:] == (1, 1)
    shared = {id(p) for p in shared_parameters(net)}
    assert shared == {id(p) for p in net.encoder.parameters()}
    decoder = net.decoders["depth"]
    assert len(decoder.blocks) == 5 and decoder.blocks[0].convs[0][0].out_channels == 8
    assert all(len(b.convs) == 3 for b in decoder.blocks)


def test_decoder_blocks_are_3x3_and_the_head_1x1_as_xtask_mt_at_head(model):
    """docs/fidelity.md: xtask_mt's HEAD decoder uses 3x3 convolutions (an older commit 1x1)."""
    for decoder in model.decoders.values():
        kernels = {m.kernel_size for b in decoder.blocks for m in b.modules()
                   if isinstance(m, nn.Conv2d)}
        assert kernels == {(3, 3)}
        assert decoder.head.kernel_size == (1, 1) and decoder.head.bias is None


def test_default_backbone_is_the_seeds_resnet34():
    net = MODELS.get("xtask_net")(HEADS, width=0.0625)
    assert len(net.encoder.stages[2]) == 6  # ResNet-34's layer3 has 6 BasicBlocks
    assert net.encoder_info.channels == 512
    grey = MODELS.get("xtask_net")(HEADS, 0.0625, BackboneConfig(depth=18), in_channels=1)
    assert grey(torch.rand(2, 1, 32, 32)).preds["depth"].shape == (2, 1, 32, 32)


# ------------------------------------------------------------------------------ losses


def test_direct_depth_losses_match_their_closed_forms():
    pred = torch.tensor([0.0, 0.5, 3.0, -2.0]).view(1, 1, 1, 4)
    target = torch.tensor([0.2, 0.5, 1.0, 1.0]).view(1, 1, 1, 4)
    d = np.array([-0.2, 0.0, 2.0, -3.0])
    expected = {
        "l1": np.abs(d),
        "mse": d**2,
        "logl1": np.log(1 + np.abs(d)),
        "smoothl1": np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5),
    }
    for kind, values in expected.items():
        got = depth_pixel_loss(kind, pred, target).view(-1).numpy()
        np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-7, err_msg=kind)


def _ssim_brute_force(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Per-window masked SSIM loss, averaged over the windows centred on a valid pixel."""
    c1, c2 = 0.01**2, 0.03**2
    p, t = pred * mask, target * mask
    h, w = p.shape
    losses = []
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            if not mask[i, j]:
                continue
            a, b = p[i - 1 : i + 2, j - 1 : j + 2], t[i - 1 : i + 2, j - 1 : j + 2]
            mu_a, mu_b = a.mean(), b.mean()
            var_a, var_b = a.var(), b.var()  # population variance, as average pooling
            cov = ((a - mu_a) * (b - mu_b)).mean()
            ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
                (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
            )
            losses.append(min(max((1 - ssim) / 2, 0.0), 1.0))
    return float(np.mean(losses)) if losses else 0.0


def test_masked_ssim_matches_a_brute_force_window_loop():
    rng = np.random.default_rng(3)
    pred = rng.random((3, 7, 9))
    target = pred * 0.5 + rng.random((3, 7, 9)) * 0.5
    mask = rng.random((3, 7, 9)) > 0.3
    mask[2] = True  # one fully valid image
    got = masked_ssim_loss(
        torch.tensor(pred)[:, None], torch.tensor(target)[:, None], torch.tensor(mask)
    )
    want = [_ssim_brute_force(pred[k], target[k], mask[k]) for k in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    same = masked_ssim_loss(
        torch.tensor(pred)[:, None], torch.tensor(pred)[:, None], torch.tensor(mask)
    )
    assert torch.allclose(same, torch.zeros(3, dtype=same.dtype), atol=1e-12)


def test_label_smoothed_cross_entropy_and_kl_by_hand():
    logits = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    labels = torch.tensor([[[0]]])
    eps = 0.3
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    log_p = [1 - z, 2 - z, 3 - z]
    q = [0.7, 0.15, 0.15]  # eps / (C - 1) on each of the other two classes
    ce = -sum(qi * lp for qi, lp in zip(q, log_p, strict=True))
    kl = sum(qi * (math.log(qi) - lp) for qi, lp in zip(q, log_p, strict=True))
    got_ce = transferred_seg_loss("ce", logits, labels, eps)
    got_kl = transferred_seg_loss("kl", logits, labels, eps)
    assert got_ce.item() == pytest.approx(ce, rel=1e-6)
    assert got_kl.item() == pytest.approx(kl, rel=1e-6)
    plain = transferred_seg_loss("ce", logits, labels, 0.0)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert transferred_seg_loss("kl", logits, labels, 0.0).item() == pytest.approx(plain.item())


# ------------------------------------------------------------------------------ method


def test_losses_combine_direct_and_transferred_terms_with_alpha_and_gamma():
    method = build_method("xtask", TASKS, {**TINY, "alpha": 0.3, "gamma": 0.2})
    seg, depth = _leaf_preds()
    batch = _batch(labelled=[[True, False], [True, True]])
    losses, _ = method.compute(FixedPreds(seg, depth), batch)
    t = method.last_terms
    assert losses.extra == {}
    assert losses.tasks["semantic"].item() == pytest.approx(
        0.7 * t["direct/semantic"].item() + 0.3 * t["transferred/depth"].item(), rel=1e-6
    )
    assert losses.tasks["depth"].item() == pytest.approx(
        0.8 * t["direct/depth"].item() + 0.2 * t["transferred/semantic"].item(), rel=1e-6
    )
    # Direct terms, per image by hand: only labelled images count, divided by the batch size.
    log_p = F.log_softmax(seg, 1).detach()
    seg_t, depth_t = batch.targets["semantic"], batch.targets["depth"]
    seg_terms, depth_terms = [], []
    for i in range(2):
        valid = seg_t[i] >= 0
        seg_terms.append(
            -log_p[i].permute(1, 2, 0)[valid].gather(1, seg_t[i][valid][:, None]).mean().item()
        )
        ok = depth_t[i, 0] != 0
        depth_terms.append(
            (depth[i, 0].detach() - depth_t[i, 0]).abs()[ok].mean().item() if ok.any() else 0.0
        )
    assert t["direct/semantic"].item() == pytest.approx(sum(seg_terms) / 2, rel=1e-5)
    assert t["direct/depth"].item() == pytest.approx(depth_terms[1] / 2, rel=1e-5)
    # Transferred terms count every image: recompute them with the method's own nets.
    with torch.no_grad():
        d_from_s = method.seg_to_depth(log_p)
        s_from_d = method.depth_to_seg(depth.detach())
    valid = torch.stack([torch.ones(16, 24, dtype=torch.bool), depth_t[1, 0] != 0])
    want_td = np.mean(
        [(d_from_s[i, 0] - depth[i, 0].detach()).abs()[valid[i]].mean().item() for i in range(2)]
    )
    want_ts = F.cross_entropy(s_from_d, log_p.argmax(1)).item()
    assert t["transferred/depth"].item() == pytest.approx(want_td, rel=1e-5)
    assert t["transferred/semantic"].item() == pytest.approx(want_ts, rel=1e-5)


@pytest.mark.parametrize("trans_depth_loss", ["l1", "ssim"])
@pytest.mark.parametrize("trans_seg_loss", ["ce", "kl"])
def test_transferred_targets_are_detached(trans_depth_loss, trans_seg_loss):
    method = build_method(
        "xtask",
        TASKS,
        {**TINY, "trans_depth_loss": trans_depth_loss, "trans_seg_loss": trans_seg_loss},
    )
    seg, depth = _leaf_preds()
    terms = method.terms(FixedPreds(seg, depth)(None).preds, _batch())

    def grads(term: str) -> tuple:
        return torch.autograd.grad(terms[term], [seg, depth], retain_graph=True, allow_unused=True)

    g_seg, g_depth = grads("transferred/depth")  # s2d(seg) vs detach(depth)
    assert g_depth is None and g_seg is not None and g_seg.abs().sum() > 0
    g_seg, g_depth = grads("transferred/semantic")  # d2s(depth) vs argmax(detach(seg))
    assert g_seg is None and g_depth is not None and g_depth.abs().sum() > 0


def test_partial_labels_direct_on_labelled_images_transferred_on_all():
    method = build_method("xtask", TASKS, {**TINY, "trans_depth_loss": "ssim"})
    seg, depth = _leaf_preds()
    model = FixedPreds(seg, depth)
    none = method.terms(model(None).preds, _batch(labelled=[[False, False], [False, False]]))
    assert none["direct/semantic"].item() == 0 and none["direct/depth"].item() == 0
    assert none["transferred/depth"].item() > 0 and none["transferred/semantic"].item() > 0
    full = method.terms(model(None).preds, _batch(labelled=[[True, False], [True, False]]))
    # No depth label anywhere: same transferred terms; seg labels change only the direct term.
    assert full["transferred/semantic"].item() == pytest.approx(none["transferred/semantic"].item())
    assert full["transferred/depth"].item() == pytest.approx(none["transferred/depth"].item())
    assert full["direct/semantic"].item() > 0


def test_trans_seg_mask_label_keeps_ignored_pixels_in_the_mean_as_the_reference():
    """trans_seg_mask=label: each pixel's CE times the seg label's valid mask (on images with
    a seg label; all pixels on the image without), divided by every pixel (by hand)."""
    method = build_method("xtask", TASKS, {**TINY, "trans_seg_mask": "label"})
    seg, depth = _leaf_preds()
    batch = _batch(labelled=[[True, True], [False, True]])
    terms = method.terms(FixedPreds(seg, depth)(None).preds, batch)
    with torch.no_grad():
        s_from_d = method.depth_to_seg(depth.detach())
    per_pixel = F.cross_entropy(s_from_d, F.log_softmax(seg, 1).detach().argmax(1),
                                reduction="none")
    keep = torch.stack([batch.targets["semantic"][0] >= 0, torch.ones(16, 24, dtype=torch.bool)])
    assert not keep[0].all()  # the constructed labels have ignored pixels
    want = (per_pixel * keep).flatten(1).mean(1).mean().item()
    assert terms["transferred/semantic"].item() == pytest.approx(want, rel=1e-6)
    plain = build_method("xtask", TASKS, TINY)
    plain.load_state_dict(method.state_dict())
    default = plain.terms(FixedPreds(seg, depth)(None).preds, batch)
    assert default["transferred/semantic"].item() == pytest.approx(per_pixel.mean().item(),
                                                                   rel=1e-6)
    assert default["transferred/semantic"].item() > terms["transferred/semantic"].item()


OPTION_SETS = [
    {"depth_loss": d, "trans_depth_loss": td, "trans_seg_loss": ts}
    for d, td, ts in itertools.product(
        ["l1", "mse", "logl1", "smoothl1"], ["l1", "ssim"], ["ce", "kl"]
    )
] + [
    {"label_smoothing": 0.1},
    {"batch_norm": True},
    {"wider": True},
    {"trans_seg_loss": "kl", "label_smoothing": 0.2, "batch_norm": True, "wider": True},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(map(str, o.values())))
def test_every_option_trains_the_model_and_the_transfer_nets(model, options):
    method = build_method("xtask", TASKS, {**TINY, "alpha": 0.1, "gamma": 0.1, **options})
    model.zero_grad()
    losses, out = method.compute(model, _batch(labelled=[[True, False], [False, True]]))
    assert out.preds["semantic"].shape == (2, C, 16, 24)
    total = sum(losses.tasks.values())
    assert torch.isfinite(total)
    total.backward()
    for net in (method.seg_to_depth, method.depth_to_seg):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_transfer_net_shapes_widths_and_batch_norm():
    narrow = build_method("xtask", TASKS, TINY).seg_to_depth
    wide = build_method("xtask", TASKS, {**TINY, "wider": True}).seg_to_depth
    full = build_method("xtask", TASKS, {}).depth_to_seg
    assert [b[0].out_channels for b in full.down] == [64, 128, 256]
    assert [b[0].out_channels for b in wide.down] == [2 * b[0].out_channels for b in narrow.down]
    assert full.final.bias is None and full.final.out_channels == C
    assert not any(isinstance(m, nn.BatchNorm2d) for m in full.modules())
    with_bn = build_method("xtask", TASKS, {**TINY, "batch_norm": True}).seg_to_depth
    assert sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules()) == 12
    net = TransferNet(3, 2, [4, 8, 16], batch_norm=False)
    assert net(torch.rand(1, 3, 13, 19)).shape == (1, 2, 13, 19)


def test_task_sets_other_than_one_seg_and_one_depth_are_config_errors():
    three = {**TASKS, "normal": build_task("normal", "normal")}
    with pytest.raises(ConfigError, match=r"method.name: xtask .*normal \(normal\)"):
        build_method("xtask", three, {})
    with pytest.raises(ConfigError, match="xtask"):
        build_method("xtask", {"a": TASKS["semantic"], "b": TASKS["semantic"]}, {})
    with pytest.raises(ConfigError, match=r"method\.options\.depth_loss"):
        build_method("xtask", TASKS, {"depth_loss": "l2"})


def test_presets_hold_the_seeds_setups():
    nyu = load_config("xtask_nyuv2")
    city = load_config("xtask_cityscapes")
    assert nyu.dataset.tasks == ["semantic", "depth"]
    for cfg, step, epochs, batch, weight in [(nyu, 60, 100, 6, 1e-4), (city, 80, 250, 8, 1e-2)]:
        assert (cfg.model.name, cfg.model.backbone.depth, cfg.method.name) == (
            "xtask_net",
            34,
            "xtask",
        )
        assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.lr == 1e-4
        assert (cfg.optim.step_size, cfg.optim.gamma) == (step, 0.5)
        assert (cfg.train.epochs, cfg.train.batch_size) == (epochs, batch)
        assert cfg.method.options["alpha"] == cfg.method.options["gamma"] == weight
        assert cfg.method.weighting == "uncertainty"
        build_method("xtask", TASKS, cfg.method.options)


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def street_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("street"), family="cityscapes", n=4, h=32, w=48)


# One of each kind: linear, with learned parameters, with its own optimiser, gradient-level. Every
# registered strategy meets the shared contract in test_registries.py; this checks xtask's
# four terms reach each kind through the CLI (a full-width ResNet-18 per run: keep it short).
@pytest.mark.parametrize("weighting", ["uniform", "uncertainty", "gradnorm", "pcgrad"])
def test_cli_trains_synthetic_xtask_with_each_kind_of_weighting(street_root, tmp_path, weighting):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            "synthetic_xtask",
            "--run-dir",
            str(run),
            f"dataset.root={street_root}",
            "model.width=0.0625",
            "model.backbone.depth=18",
            "method.options.transfer_width=0.125",
            f"method.weighting={weighting}",
            "train.epochs=1",
            "train.batch_size=2",
            "train.max_steps_per_epoch=2",
            "train.eval_batch_size=4",
            "train.progress=false",
            "labels.regime=onelabel",
        ]
    )
    assert code == 0
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ["semantic/miou", "semantic/pixel_acc", "depth/abs_err", "depth/rel_err"]:
        assert np.isfinite(final["metrics"][key]), key
    state = load_checkpoint(run / "checkpoint.pt")
    assert any(k.startswith("seg_to_depth.") for k in state["method"])
    assert any(k.startswith("decoders.depth.") for k in state["model"])
    # model.backbone.depth reaches the builder: ResNet-18's layer3 has 2 blocks, not 6.
    assert "encoder.stages.2.1.conv1.weight" in state["model"]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ["direct/semantic", "direct/depth", "transferred/semantic", "transferred/depth"]:
        assert np.isfinite(row[f"train/{key}"]), key
    assert "encoder.stages.2.2.conv1.weight" not in state["model"]


@pytest.mark.parametrize(
    "preset, family", [("xtask_nyuv2", "nyuv2"), ("xtask_cityscapes", "cityscapes")]
)
def test_cli_runs_the_published_presets_at_tiny_size(tmp_path, preset, family):
    root = make_layout(tmp_path, family=family, n=4, h=32, w=48)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            preset,
            "--run-dir",
            str(run),
            f"dataset.root={root}",
            "model.width=0.0625",
            "model.backbone.depth=18",
            "method.options.transfer_width=0.125",
            "train.epochs=1",
            "train.batch_size=2",
            "train.max_steps_per_epoch=1",
            "train.eval_batch_size=4",
            "train.progress=false",
        ]
    )
    assert code == 0
    final = json.loads((run / "final_metrics.json").read_text())
    assert {"depth/abs_err", "semantic/miou"} <= set(final["metrics"])
    assert not any(k.startswith("normal/") for k in final["metrics"])
    assert "log_vars.0" in load_checkpoint(run / "checkpoint.pt")["weighting"]


CLI_OPTION_SETS = [  # every value of every option appears in at least one CLI run
    ["depth_loss=l1", "trans_depth_loss=ssim", "trans_seg_loss=kl", "label_smoothing=0.1",
     "batch_norm=true"],
    ["depth_loss=mse", "trans_depth_loss=l1", "trans_seg_loss=ce", "wider=true"],
    ["depth_loss=logl1", "trans_depth_loss=ssim", "trans_seg_loss=ce", "alpha=0.01"],
    ["depth_loss=smoothl1", "trans_depth_loss=l1", "trans_seg_loss=kl", "batch_norm=true",
     "wider=true", "gamma=0.01"],
]


@pytest.mark.parametrize("options", CLI_OPTION_SETS, ids=lambda o: o[0].split("=")[1])
def test_cli_trains_with_each_option_value(street_root, tmp_path, options):
    run = tmp_path / "run"
    overrides = [f"method.options.{o}" for o in options]
    code = main(
        ["train", "--config", "synthetic_xtask", "--run-dir", str(run),
         f"dataset.root={street_root}", "model.width=0.0625", "model.backbone.depth=18",
         "method.options.transfer_width=0.125", "train.epochs=1", "train.batch_size=2",
         "train.max_steps_per_epoch=2", "train.eval_batch_size=4", "train.progress=false",
         *overrides]
    )
    assert code == 0
    saved = load_checkpoint(run / "checkpoint.pt")["config"]["method"]["options"]
    for option in options:
        key, value = option.split("=")
        assert str(saved[key]).lower() == value, key
