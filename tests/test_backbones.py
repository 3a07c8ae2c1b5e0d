"""Dilated ResNet + PSP/ASPP/DeepLab/conv heads (model ``resnet``): shapes, output strides,
parameter counts against closed forms, head selection, local weights, CLI runs and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import resnet18, resnet34

from mtpsl.cli import main
from mtpsl.core.config import BackboneConfig
from mtpsl.core.errors import ConfigError
from mtpsl.models import HeadSpec, build_model, count_parameters
from mtpsl.models.dense import resolve_heads
from mtpsl.models.heads import ASPP_RATES
from mtpsl.tasks import build_task

from conftest import NYU_HEADS, NYU_TASKS, TINY, final_metrics, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")


TASKS, HEADS = NYU_TASKS, NYU_HEADS
W = 0.0625


def _model(os_: int = 8, head=None, depth: int = 18, **kw):
    torch.manual_seed(0)
    bb = BackboneConfig(depth=depth, output_stride=os_, **kw)
    return build_model("resnet", HEADS, width=W, backbone=bb, head=head)


def _trunk_params(depth: int = 18) -> int:
    net = {18: resnet18, 34: resnet34}[depth](weights=None)
    return count_parameters(net) - net.fc.weight.numel() - net.fc.bias.numel()


def _head_params(kind: str, c_in: int, c_out: int, os_: int, w: float) -> int:
    """Closed forms of the heads (bias-free convs + BN pairs, biased 1x1 classifiers)."""
    if kind == "psp":
        b, mid = round(c_in // 4 * w), round(512 * w)
        return 4 * (c_in * b + 2 * b) + (c_in + 4 * b) * mid * 9 + 2 * mid + mid * c_out + c_out
    if kind in ("aspp", "deeplab"):
        m = round(256 * w)
        aspp = (c_in * m + 2 * m) + 3 * (9 * c_in * m + 2 * m) + (c_in * m + 2 * m)
        aspp += 5 * m * m + 2 * m
        refine = 9 * m * m + 2 * m if kind == "deeplab" else 0
        return aspp + refine + m * c_out + c_out
    c = round(256 * w)
    total = 9 * c_in * c + 2 * c
    for _ in range(int(math.log2(os_))):
        nxt = max(1, c // 2)
        total += 9 * c * nxt + 2 * nxt
        c = nxt
    return total + c * c_out + c_out


KINDS = ["psp", "aspp", "deeplab", "conv"]


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_shapes_and_parameter_counts(os_):
    """Every head kind at every output stride (4 tasks, the kinds rotated per stride)."""
    tasks = {**TASKS, "far": build_task("depth", "far")}
    shift = [8, 16, 32].index(os_)
    kinds = {name: KINDS[(i + shift) % 4] for i, name in enumerate(tasks)}
    torch.manual_seed(0)
    heads = {n: HeadSpec.of(t) for n, t in tasks.items()}
    model = build_model(
        "resnet", heads, width=W, head=kinds, backbone=BackboneConfig(depth=18, output_stride=os_)
    )
    assert model.head_kinds == kinds
    x = torch.rand(2, 3, 33, 50)  # sides not multiples of the stride
    out = model(x)
    assert model.encoder_info.channels == 512
    expected = (2, 512, math.ceil(33 / os_), math.ceil(50 / os_))
    assert tuple(out.features["encoder"].shape) == expected
    assert model.encoder_info.size(33, 50) == expected[2:]
    for name, t in tasks.items():
        assert out.preds[name].shape == (2, t.out_channels, 33, 50)
    torch.testing.assert_close(out.preds["semantic"].exp().sum(1), torch.ones(2, 33, 50))
    torch.testing.assert_close(out.preds["normal"].norm(dim=1), torch.ones(2, 33, 50))
    n_heads = sum(_head_params(kinds[n], 512, t.out_channels, os_, W) for n, t in tasks.items())
    assert count_parameters(model) == _trunk_params() + n_heads


def test_default_heads_and_selection_by_kind_or_task():
    assert resolve_heads(None, HEADS) == {"semantic": "psp", "depth": "conv", "normal": "conv"}
    assert resolve_heads("aspp", HEADS) == dict.fromkeys(HEADS, "aspp")
    mixed = resolve_heads({"segmentation": "deeplab", "normal": "aspp", "depth": "psp"}, HEADS)
    assert mixed == {"semantic": "deeplab", "depth": "psp", "normal": "aspp"}
    # A task name wins over its kind.
    assert (
        resolve_heads({"depth": "conv", "semantic": "aspp", "segmentation": "psp"}, HEADS)[
            "semantic"
        ]
        == "aspp"
    )
    with pytest.raises(ConfigError, match=r"model.options.head: unknown head 'fcn'.*psp"):
        resolve_heads("fcn", HEADS)
    with pytest.raises(ConfigError, match=r"model.options.head.sky: neither a task"):
        resolve_heads({"sky": "psp"}, HEADS)


@pytest.mark.parametrize(("os_", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18))])
def test_aspp_rates_follow_the_output_stride(os_, rates):
    assert ASPP_RATES[os_] == rates
    model = _model(os_, head="aspp")
    dilations = sorted(
        {
            m.dilation[0]
            for m in model.heads["depth"].modules()
            if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1
        }
    )
    assert tuple(dilations) == rates


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_dilation_keeps_resnet_weights_shapes_and_strides(os_):
    model = _model(os_)
    trunk = model.trunk
    strides = [trunk.stem[0].stride[0]] + [b.conv1.stride[0] for s in trunk.stages for b in s]
    assert math.prod(strides) * 2 == os_  # the stem's max-pool is the missing factor 2
    assert count_parameters(model.trunk) == _trunk_params()


def test_shared_parameters_are_the_trunk_in_forward_order():
    model = _model(32)
    shared = model.shared_parameters()
    assert [id(p) for p in shared] == [id(p) for p in model.trunk.parameters()]
    assert shared[0] is model.trunk.stem[0].weight
    head_ids = {id(p) for p in model.heads.parameters()}
    assert not head_ids & {id(p) for p in shared}


def test_local_torchvision_weights_load_and_wrong_files_fail(tmp_path):
    torch.manual_seed(1)
    reference = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = _model(8, weights=str(path))
    torch.testing.assert_close(
        model.trunk.stages[3][1].conv2.weight, reference.layer4[1].conv2.weight
    )
    torch.testing.assert_close(model.trunk.stem[0].weight, reference.conv1.weight)
    with pytest.raises(ConfigError, match=r"model\.backbone\.weights.*does not fit"):
        _model(8, depth=34, weights=str(path))
    with pytest.raises(ConfigError, match=r"model\.backbone\.weights.*does not exist"):
        _model(8, weights=str(tmp_path / "missing.pth"))


# --- end to end from the CLI -------------------------------------------------------------

RESNET = [
    *TINY,
    "model.name=resnet",
    "model.backbone.depth=18",
    "model.backbone.output_stride=32",
    "train.max_steps_per_epoch=1",
    "optim.lr=1e-3",
]


@pytest.mark.parametrize(
    "extra",
    [
        ["method.name=sl", "model.backbone.output_stride=16"],
        ["method.name=stl", "model.options={head: {depth: aspp, semantic: deeplab}}"],
        ["method.name=ssl", "model.options.head=aspp"],
        ["method.name=xtc", "method.options.mapper=resnet18", "method.options.width=0.125"],
    ],
    ids=["sl", "stl", "ssl", "xtc"],
)
def test_train_resnet_end_to_end(tiny_root, tmp_path, extra):
    final = final_metrics(train_cli(tmp_path / "run", tiny_root, *RESNET, *extra))
    assert all(math.isfinite(v) for v in final["metrics"].values())
    if "method.name=stl" in extra:  # one trunk per task, each with the head asked for
        heads = {"semantic": "deeplab", "depth": "aspp", "normal": "conv"}
        expected = sum(
            _trunk_params() + _head_params(heads[n], 512, t.out_channels, 32, W)
            for n, t in TASKS.items()
        )
        assert final["parameters"] == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.options.colour=red",
            "model.options.colour: unknown option for model 'resnet'; "
            "allowed: head, aspp_rates, psp_bins, neck",
        ),
        ("model.options.head=fcn", "model.options.head: unknown head 'fcn'"),
        ("model.options.aspp_rates=[0, 2]", "model.options.aspp_rates: expected a non-empty"),
        ("model.backbone.weights=/nowhere/r18.pth", "model.backbone.weights: /nowhere/r18.pth"),
        ("model.backbone.depth=20", "model.backbone.depth"),
        ("model.backbone.output_stride=4", "model.backbone.output_stride"),
    ],
)
def test_cli_errors_name_the_key(tiny_root, tmp_path, capsys, override, message):
    code = main(
        ["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={tiny_root}", *RESNET, override]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_segnet_takes_no_options_and_xtc_segnet_mapper_refuses_a_resnet(
    tiny_root, tmp_path, capsys
):
    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "a"),
            f"dataset.root={tiny_root}",
            *RESNET,
            "model.name=segnet",
            "model.options.head=psp",
        ]
    )
    assert code == 2
    assert "model.options.head: unknown option for model 'segnet'; allowed: (none)" in (
        capsys.readouterr().err
    )
    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "b"),
            f"dataset.root={tiny_root}",
            *RESNET,
            "method.name=xtc",
        ]
    )
    assert code == 2
    assert "method.options.mapper" in capsys.readouterr().err
