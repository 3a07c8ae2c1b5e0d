"""The encoder seam with timm: any ``features_only`` model by name, local weights only,
channels/reductions/size from the encoder, an FPN neck, and sl / xtc trained from the config
alone (ConvNeXt-atto, the smallest timm ConvNeXt, on tiny images)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtpsl.cli import main
from mtpsl.core.errors import ConfigError
from mtpsl.models import build_model, shared_parameters
from mtpsl.models.encoders import EncoderSpec, build_encoder

from conftest import NYU_HEADS, TINY, final_metrics, train_cli

timm = pytest.importorskip("timm")
ARCH = "convnext_atto"
TIMM = [*TINY, "model.name=dense", "model.backbone.name=timm", f"model.backbone.arch={ARCH}",
        "model.backbone.output_stride=32", "model.options.neck=fpn", "model.width=0.125",
        "train.max_steps_per_epoch=2", "optim.lr=1e-3"]


def _spec(**kw) -> EncoderSpec:
    return EncoderSpec(**{"name": "timm", "arch": ARCH, "output_stride": 32, **kw})


def test_local_weights_are_the_saved_classification_model(tmp_path):
    torch.manual_seed(3)
    full = timm.create_model(ARCH, pretrained=False)
    path = tmp_path / "convnext_atto.pth"
    torch.save(full.state_dict(), path)
    torch.manual_seed(4)  # a different random init: only the file can make them equal
    loaded = build_encoder(_spec(weights=str(path))).net.state_dict()
    fresh = build_encoder(_spec()).net.state_dict()
    saved = full.state_dict()
    # features_only renames the top-level modules (stem.0 -> stem_0, stages.3 -> stages_3)
    for key in ("stem.0.weight", "stages.3.blocks.1.mlp.fc2.weight"):
        feature_key = key.replace(".", "_", 1)
        assert torch.equal(loaded[feature_key], saved[key])
        assert not torch.equal(fresh[feature_key], saved[key])


def test_declared_channels_reductions_and_size_match_the_maps():
    enc = build_encoder(_spec(output_stride=8))
    maps = enc(torch.zeros(1, 3, 37, 61))
    assert [m.shape[1] for m in maps] == list(enc.channels) == [40, 80, 160, 320]
    assert list(enc.reductions) == [4, 8, 8, 8]  # dilated last stages
    assert enc.feature_size(37, 61) == tuple(maps[-1].shape[-2:])
    assert enc.training  # measuring a size leaves the mode alone


def test_dense_model_with_fpn_on_a_timm_encoder():
    model = build_model("dense", NYU_HEADS, width=0.125, backbone=_spec(), neck="fpn")
    out = model(torch.zeros(2, 3, 32, 48))
    assert {k: tuple(v.shape) for k, v in out.preds.items()} == {
        "semantic": (2, 13, 32, 48), "depth": (2, 1, 32, 48), "normal": (2, 3, 32, 48)}
    info = model.encoder_info
    assert out.features["encoder"].shape[1:] == (info.channels, *info.size(32, 48))
    shared = {id(p) for p in shared_parameters(model)}
    assert all(id(p) in shared for p in model.neck.parameters())
    assert not any(id(p) in shared for p in model.heads.parameters())


@pytest.mark.parametrize(
    ("spec", "message"),
    [({"arch": None}, "model.backbone.arch: name the timm model"),
     ({"arch": "convnext_attoo"}, "timm has no model 'convnext_attoo'"),
     ({"weights": "/nowhere/w.pth"}, "model.backbone.weights: /nowhere/w.pth does not exist"),
     ({"options": {"features_only": False}}, "model.backbone.options: ['features_only']")],
)
def test_bad_timm_configs_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build_encoder(_spec(**spec))


@pytest.mark.parametrize(
    "method", [["method.name=sl"], ["method.name=xtc", "method.options.mapper=resnet18",
                                    "method.options.width=0.125"]], ids=["sl", "xtc"])
def test_trains_from_the_config_alone(tiny_root, tmp_path, method):
    run = train_cli(tmp_path / "run", tiny_root, *TIMM, *method)
    final = final_metrics(run)
    assert all(math.isfinite(v) for v in final["metrics"].values())
    # The checkpoint rebuilds the timm model from its stored config and gives the same numbers.
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--device", "cpu", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    metrics = again.get("metrics", again)
    assert all(metrics[k] == pytest.approx(v, rel=1e-6) for k, v in final["metrics"].items()
               if k in metrics)
    assert set(final["metrics"]) & set(metrics)
