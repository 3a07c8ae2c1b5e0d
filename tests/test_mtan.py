"""SegNet-MTAN (Liu et al. CVPR 2019): parameter count, trunk identity with SegNet, per-task
attention isolation, shapes on odd sizes, and CLI runs."""

from __future__ import annotations

import math

import pytest
import torch

from mtpsl.models import SegNet, build_model, count_parameters

from conftest import NYU_HEADS, NYU_TASKS, TINY, final_metrics, train_cli

pytestmark = pytest.mark.usefixtures("one_thread")


TASKS, HEADS = NYU_TASKS, NYU_HEADS


def _att(c_in: int, c_mid: int, c_out: int) -> int:
    # conv1x1 (bias) + BN, conv1x1 (bias) + BN
    return c_in * c_mid + c_mid + 2 * c_mid + c_mid * c_out + c_out + 2 * c_out


def _cbr(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out + 2 * c_out


def test_parameter_count_matches_the_mtan_repository():
    """NYUv2 (13/1/3 channels) at width 1: 44,229,073 parameters = the network of the MTAN
    repository's ``segnet_mtan.py`` (its "44.2M") without its 3 uncertainty log-sigmas, which
    belong to a loss weighting, not to the network. Counted here, independently of the module's
    code, from the reference's layer list:

    - the SegNet trunk + heads (25,055,185, pinned in test_segnet);
    - per task, encoder attention att(f0,f0,f0), att(2f_j,f_j,f_j) for j=1..4, and decoder
      attention att(2f0,f0,f0), att(f_j+f_{j-1}, f_{j-1}, f_{j-1}) for j=1..4;
    - shared by the tasks' branches: encoder conv_bn_relu f0->f1->f2->f3->f4, f4->f4 and
      decoder conv_bn_relu f0->f0, f1->f0, f2->f1, f3->f2, f4->f4.
    """
    f = [64, 128, 256, 512, 512]
    per_task = _att(f[0], f[0], f[0]) + sum(_att(2 * f[j], f[j], f[j]) for j in range(1, 5))
    per_task += _att(2 * f[0], f[0], f[0])
    per_task += sum(_att(f[j] + f[j - 1], f[j - 1], f[j - 1]) for j in range(1, 5))
    shared = sum(
        _cbr(a, b)
        for a, b in [(f[0], f[1]), (f[1], f[2]), (f[2], f[3]), (f[3], f[4]), (f[4], f[4])]
    )
    shared += sum(
        _cbr(a, b)
        for a, b in [(f[0], f[0]), (f[1], f[0]), (f[2], f[1]), (f[3], f[2]), (f[4], f[4])]
    )
    expected = 25_055_185 + 3 * per_task + shared
    with torch.device("meta"):
        model = build_model("mtan", HEADS)
        segnet = build_model("segnet", HEADS)
    assert count_parameters(model) == expected == 44_229_073
    assert round(count_parameters(model) / 1e6, 1) == 44.2
    # shared_parameters(): exactly SegNet's shared trunk, in the same order.
    assert [p.shape for p in model.shared_parameters()] == [
        p.shape for p in segnet.shared_parameters()
    ]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build_model("mtan", HEADS, width=0.125)
    return model


def test_shapes_on_sides_not_multiple_of_32(tiny):
    x = torch.rand(2, 3, 40, 56)
    out = tiny(x)
    for name, t in TASKS.items():
        assert out.preds[name].shape == (2, t.out_channels, 40, 56)
    torch.testing.assert_close(out.preds["semantic"].exp().sum(1), torch.ones(2, 40, 56))
    torch.testing.assert_close(out.preds["normal"].norm(dim=1), torch.ones(2, 40, 56))
    assert out.features["encoder"].shape == (2, tiny.encoder_info.channels, 40 // 32, 56 // 32)


def test_encoder_feature_is_the_shared_segnet_trunk(tiny):
    """The trunk is SegNet's: loading the trunk weights into a SegNet gives the same feature."""
    segnet = SegNet(HEADS, width=0.125)
    trunk = {k: v for k, v in tiny.state_dict().items() if k in segnet.state_dict()}
    segnet.load_state_dict(trunk)
    x = torch.rand(2, 3, 64, 96)
    tiny.eval()
    segnet.eval()
    with torch.no_grad():
        torch.testing.assert_close(tiny(x).features["encoder"], segnet(x).features["encoder"])
    assert tiny.encoder_info.channels == segnet.encoder_info.channels


def test_each_task_reads_the_trunk_through_its_own_attention(tiny):
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():  # train-mode BN: activations stay O(1) through the deep net
        before = tiny(x).preds
        for p in tiny.encoder_att["depth"].parameters():
            p.add_(0.5 * torch.randn_like(p))
        after = tiny(x).preds
    torch.testing.assert_close(after["semantic"], before["semantic"])
    torch.testing.assert_close(after["normal"], before["normal"])
    change = (after["depth"] - before["depth"]).abs().max()
    assert change > 1e-2 * before["depth"].abs().max()


def test_shared_parameters_get_every_tasks_gradient(tiny):
    out = tiny(torch.rand(2, 3, 32, 32))
    shared = tiny.shared_parameters()
    names = {id(p): n for n, p in tiny.named_parameters()}
    assert all(
        names[id(p)].split(".")[0]
        in {"encoder_block", "conv_block_enc", "decoder_block", "conv_block_dec"}
        for p in shared
    )
    for task in TASKS:
        grads = torch.autograd.grad(
            out.preds[task].sum(), shared, retain_graph=True, allow_unused=True
        )
        assert all(g is not None for g in grads), task


# --- end to end from the CLI -------------------------------------------------------------

MTAN = [*TINY, "model.name=mtan", "train.max_steps_per_epoch=2", "optim.lr=1e-3"]


@pytest.mark.parametrize(
    "extra",
    [
        ["method.name=sl"],
        ["method.name=xtc"],
        ["method.name=xtc", "method.options.mapper=resnet18", "method.options.width=0.0625"],
    ],
    ids=["sl", "xtc", "xtc-resnet18-mapper"],
)
def test_train_mtan_end_to_end(tiny_root, tmp_path, extra):
    final = final_metrics(train_cli(tmp_path / "run", tiny_root, *MTAN, *extra))
    assert all(math.isfinite(v) for v in final["metrics"].values())
    with torch.device("meta"):
        expected = count_parameters(build_model("mtan", HEADS, width=0.0625))
    assert final["parameters"] == expected
