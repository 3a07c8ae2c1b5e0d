"""SegNet split / PerTaskModels: the reference layout, shapes, activations and isolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.models import (
    MODELS,
    HeadSpec,
    ModelOutput,
    PerTaskModels,
    SegNet,
    build_model,
    conv_bn_relu,
    count_parameters,
)

# MTAN/MTPSL reference count (25,055,188) includes a 3-element uncertainty log-sigma parameter
# that belongs to a loss-weighting scheme, not to the network; the network itself is 3 fewer.
REFERENCE_COUNT = 25_055_188
REFERENCE_LOGSIGMA = 3


def _log_softmax(t: Tensor) -> Tensor:
    return F.log_softmax(t, dim=1)


def _identity(t: Tensor) -> Tensor:
    return t


def _l2_normalise(t: Tensor) -> Tensor:
    return F.normalize(t, p=2, dim=1)


HEADS = {
    "semantic": HeadSpec(13, _log_softmax),
    "depth": HeadSpec(1, _identity),
    "normal": HeadSpec(3, _l2_normalise),
}


def _model(width: float = 0.125, heads: dict[str, HeadSpec] | None = None, seed: int = 0) -> SegNet:
    torch.manual_seed(seed)
    model = build_model("segnet", HEADS if heads is None else heads, width=width)
    assert isinstance(model, SegNet)
    return model


def test_registered() -> None:
    assert "segnet" in MODELS


def test_parameter_count_width1_matches_reference() -> None:
    with torch.device("meta"):
        model = build_model("segnet", HEADS)
    assert count_parameters(model) == REFERENCE_COUNT - REFERENCE_LOGSIGMA


@pytest.mark.parametrize(
    ("channels", "expected"), [(13, 24_981_069), (1, 24_980_289), (3, 24_980_419)]
)
def test_parameter_count_one_head(channels: int, expected: int) -> None:
    with torch.device("meta"):
        model = build_model("segnet", {"t": HeadSpec(channels, _identity)})
    assert count_parameters(model) == expected


def test_layer_layout_width1() -> None:
    with torch.device("meta"):
        model = _model(width=1.0)
    assert model.filters == [64, 128, 256, 512, 512]
    assert model.encoder_info.channels == 512
    assert model.encoder_info.reduction == 32
    enc_extra = [
        len([m for m in b.modules() if isinstance(m, nn.Conv2d)]) for b in model.conv_block_enc
    ]
    dec_extra = [
        len([m for m in b.modules() if isinstance(m, nn.Conv2d)]) for b in model.conv_block_dec
    ]
    assert enc_extra == [1, 1, 2, 2, 2]
    assert dec_extra == [1, 1, 2, 2, 2]
    dec_io = [(b[0].in_channels, b[0].out_channels) for b in model.decoder_block]
    assert dec_io == [(64, 64), (128, 64), (256, 128), (512, 256), (512, 512)]


def test_init_follows_reference() -> None:
    model = _model()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is not None and torch.all(m.bias == 0)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_conv_bn_relu_helper() -> None:
    block = conv_bn_relu(4, 6)
    out = block(torch.randn(2, 4, 5, 7))
    assert out.shape == (2, 6, 5, 7)
    assert torch.all(out >= 0)


@pytest.mark.parametrize("size", [(36, 52), (64, 96)])
def test_shapes_and_activations(size: tuple[int, int]) -> None:
    h, w = size
    model = _model()
    out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, ModelOutput)
    assert set(out.preds) == set(HEADS)
    assert out.preds["semantic"].shape == (2, 13, h, w)
    assert out.preds["depth"].shape == (2, 1, h, w)
    assert out.preds["normal"].shape == (2, 3, h, w)
    probs = out.preds["semantic"].exp().sum(dim=1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-5)
    norms = out.preds["normal"].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    enc = out.features["encoder"]
    assert enc.shape == (2, model.encoder_info.channels, h // 32, w // 32)


def test_gradients_reach_every_parameter() -> None:
    model = _model()
    out = model(torch.randn(2, 3, 36, 52))
    loss = sum(p.mean() for p in out.preds.values()) + out.features["encoder"].mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_one_head_variant() -> None:
    model = _model(heads={"depth": HEADS["depth"]})
    out = model(torch.randn(2, 3, 64, 96))
    assert list(out.preds) == ["depth"]
    assert out.preds["depth"].shape == (2, 1, 64, 96)
    assert out.features["encoder"].shape == (2, model.encoder_info.channels, 2, 3)


def test_per_task_models_merge_and_isolation() -> None:
    nets = {
        task: _model(heads={task: spec}, seed=i) for i, (task, spec) in enumerate(HEADS.items())
    }
    stl = PerTaskModels(nets).eval()
    x = torch.randn(2, 3, 36, 52)
    with torch.no_grad():
        before = stl(x)
    assert set(before.preds) == set(HEADS)
    assert "encoder" not in before.features
    assert set(before.features) == {f"encoder/{t}" for t in HEADS}
    assert before.preds["semantic"].shape == (2, 13, 36, 52)
    assert count_parameters(stl) == sum(count_parameters(n) for n in nets.values())

    with torch.no_grad():
        for p in nets["depth"].parameters():
            p.add_(0.5)
        after = stl(x)
    assert not torch.allclose(after.preds["depth"], before.preds["depth"])
    assert torch.equal(after.preds["semantic"], before.preds["semantic"])
    assert torch.equal(after.preds["normal"], before.preds["normal"])


def test_per_task_models_rejects_missing_pred() -> None:
    stl = PerTaskModels({"depth": _model(heads={"normal": HEADS["normal"]})})
    with pytest.raises(KeyError, match="depth"):
        stl(torch.randn(1, 3, 32, 32))


def test_deterministic_eval_for_same_seed() -> None:
    x = torch.randn(2, 3, 36, 52)
    a, b = _model(seed=7).eval(), _model(seed=7).eval()
    with torch.no_grad():
        out_a, out_b = a(x), b(x)
        out_a2 = a(x)
    for task in HEADS:
        assert torch.equal(out_a.preds[task], out_b.preds[task])
        assert torch.equal(out_a.preds[task], out_a2.preds[task])


def test_channels_last_matches_contiguous() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 36, 52)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.contiguous(memory_format=torch.channels_last))
    for task in HEADS:
        assert torch.allclose(out.preds[task], ref.preds[task], atol=1e-4, rtol=1e-4), task
    assert torch.allclose(out.features["encoder"], ref.features["encoder"], atol=1e-4, rtol=1e-4)


def test_rejects_empty_heads_and_bad_width() -> None:
    with pytest.raises(ValueError):
        SegNet(heads={})
    with pytest.raises(ValueError):
        SegNet(heads=HEADS, width=0.0)
