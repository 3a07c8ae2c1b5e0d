"""XTC with the ResNet-18-style mapping network (issue 6): batched loss = per-sample reference,
5 tasks -> 20 ordered pairs through one conditioned network, size/channel matching, counts."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import resnet18

from mtpsl.config import BackboneConfig
from mtpsl.errors import ConfigError
from mtpsl.methods import build_method
from mtpsl.methods.joint_space import FiLM
from mtpsl.methods.joint_space_resnet import ResNetJointSpaceMapper, mapper_for_model
from mtpsl.methods.xtc import XTCLoss, consistency_pairs
from mtpsl.models import HeadSpec, build_model, count_parameters
from mtpsl.tasks import SegmentationTask, build_task

pytestmark = pytest.mark.usefixtures("one_thread")


FIVE = {
    "semseg": build_task("segmentation", "semseg", num_classes=5),
    "parts": build_task("segmentation", "parts", num_classes=3),
    "normals": build_task("normal", "normals"),
    "depth": build_task("depth", "depth"),
    "sal": build_task("depth", "sal"),  # any 1-channel dense task: its encoders are the same
}


def _targets(tasks, b: int, h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, t in tasks.items():
        if isinstance(t, SegmentationTask):
            out[name] = torch.randint(-1, t.num_classes, (b, h, w), generator=g)
        elif t.out_channels == 3:
            v = torch.randn(b, 3, h, w, generator=g, dtype=torch.float64)
            out[name] = v / v.norm(dim=1, keepdim=True)
        else:
            out[name] = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64) * 5
    return out


def _preds(tasks, b: int, h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {
        n: t.activate(
            torch.randn(
                b, t.out_channels, h, w, generator=g, dtype=torch.float64, requires_grad=False
            )
        )
        for n, t in tasks.items()
    }


def _soft(task, x):
    # Deterministic stand-in for the Gumbel sample, so both forms see identical inputs.
    return x.exp() if isinstance(task, SegmentationTask) else task.encode_pred(x)


def _perturb_film(mapper) -> None:
    with torch.no_grad():
        for p in mapper.film_parameters():
            p.add_(0.3 * torch.randn_like(p))


def _check_equal(loss, preds, targets, feature, labelled, params):
    batched = loss.consistency(preds, targets, feature, labelled, _soft)
    reference = loss.reference_consistency(preds, targets, feature, labelled, _soft)
    torch.testing.assert_close(batched, reference, rtol=1e-10, atol=1e-10)
    g_b = torch.autograd.grad(batched.sum(), params, retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(reference.sum(), params, allow_unused=True)
    total = torch.stack([g.norm() for g in g_r if g is not None]).norm()
    for a, b in zip(g_b, g_r, strict=True):
        assert (a is None) == (b is None)
        if a is not None:  # biases before a norm have ~0 true gradient: compare on the total
            assert (a - b).norm() <= 1e-9 * torch.maximum(b.norm(), 1e-3 * total)
    return batched


@pytest.mark.parametrize(("os_", "c_out", "h", "w"), [(8, 24, 24, 32), (32, 64, 40, 72)])
def test_batched_equals_reference_three_tasks(os_, c_out, h, w):
    """float64: the batched (per-sample norm) and batch-1 BatchNorm forms are one function,
    in value and gradient, including the channel projection (c_out != last width)."""
    tasks = {k: FIVE[k] for k in ("semseg", "depth", "normals")}
    torch.manual_seed(0)

    def size(h: int, w: int) -> tuple[int, int]:
        return math.ceil(h / os_), math.ceil(w / os_)

    mapper = ResNetJointSpaceMapper(
        {n: t.out_channels for n, t in tasks.items()},
        c_out,
        width=0.125,
        output_stride=os_,
        feature_size=size,
    ).double()
    _perturb_film(mapper)
    b = 4
    feature = torch.randn(b, c_out, *size(h, w), dtype=torch.float64)
    labelled = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    per_image = _check_equal(
        XTCLoss(tasks, mapper, 0.5),
        _preds(tasks, b, h, w),
        _targets(tasks, b, h, w),
        feature,
        labelled,
        list(mapper.parameters()),
    )
    assert per_image[3] == 0 and (per_image[:3] > 0).all()


def test_five_tasks_give_twenty_pairs_through_one_network():
    torch.manual_seed(0)
    mapper = ResNetJointSpaceMapper(
        {n: t.out_channels for n, t in FIVE.items()}, 16, width=0.0625, output_stride=32
    ).double()
    assert mapper.n_pairs == 20
    films = [m for m in mapper.modules() if isinstance(m, FiLM)]
    assert films and all(m.gamma.weight.shape[1] == 20 for m in films)
    assert set(mapper.inputs) == set(FIVE)  # one input conv per task, one shared trunk
    _perturb_film(mapper)
    labelled = torch.ones(1, 5, dtype=torch.bool)
    rows = consistency_pairs(labelled)
    assert sorted(rows.pair.tolist()) == list(range(20))
    b, h, w = 1, 32, 64  # per-sample norms need more than one position at 1/32
    feature = torch.randn(b, 16, 1, 2, dtype=torch.float64)
    _check_equal(
        XTCLoss(FIVE, mapper, 0.5),
        _preds(FIVE, b, h, w),
        _targets(FIVE, b, h, w),
        feature,
        labelled,
        list(mapper.parameters()),
    )
    # Conditioning matters: the same input mapped for two different pairs differs.
    x = torch.rand(2, 1, h, w, dtype=torch.float64)
    m = mapper("depth", x, torch.tensor([0, 7]))
    assert not torch.allclose(m[0], mapper("depth", x[1:], torch.tensor([0]))[0])


def test_parameter_count_is_resnet18_plus_inputs_film_and_projection():
    """Width 1: the four stages hold torchvision ResNet-18's layer1-4 parameters (BN affine =
    SampleNorm affine); plus the shared 3x3 stride-2 stem (no bias) + norm, one 3x3 input conv
    (with bias) + norm per task, the 1x1 projection, and FiLM = 2 x pairs x normed channels."""
    in_ch = {"semantic": 13, "depth": 1, "normal": 3}
    mapper = ResNetJointSpaceMapper(in_ch, 256, width=1.0)
    tv = resnet18(weights=None)
    stages = sum(count_parameters(getattr(tv, f"layer{i}")) for i in range(1, 5))
    inputs = sum(9 * c * 64 + 64 + 128 for c in in_ch.values())
    stem = 9 * 64 * 64 + 128
    project = 512 * 256 + 256
    normed = 64 + sum(2 * c for c in (64, 128, 256, 512) for _ in range(2)) + 128 + 256 + 512
    film = 2 * 6 * normed
    assert sum(p.numel() for p in mapper.film_parameters()) == film
    assert sum(p.numel() for p in mapper.other_parameters()) == stages + inputs + stem + project
    plain = ResNetJointSpaceMapper(in_ch, 512, conditioned=False)
    assert plain.film_parameters() == [] and plain.project is None


HEADS3 = {
    n: HeadSpec(FIVE[n].out_channels, FIVE[n].activate) for n in ("semseg", "depth", "normals")
}


@pytest.mark.parametrize(
    ("name", "kwargs", "h", "w"),
    [
        ("resnet", {"backbone": BackboneConfig(depth=18, output_stride=8)}, 33, 47),
        ("resnet", {"backbone": BackboneConfig(depth=18, output_stride=16)}, 40, 56),
        ("segnet", {}, 40, 72),
        ("mtan", {}, 64, 72),
        ("xtask_net", {"backbone": BackboneConfig(depth=18)}, 40, 72),
    ],
)
def test_mapper_output_matches_the_model_encoder_feature(name, kwargs, h, w):
    """Channels via the final 1x1 conv; size via the model's feature_size (ResNets round up)
    or floor(H/32) (SegNet/MTAN pooling: 40x72 -> 1x2 while the mapper gives 2x3, pooled);
    a ResNet-trunk model without feature_size (xtask_net) rounds up like the mapper."""
    torch.manual_seed(0)
    model = build_model(name, HEADS3, width=0.0625, **kwargs)
    feature = model(torch.rand(2, 3, h, w)).features["encoder"]
    mapper = mapper_for_model(model, {"depth": 1}, True, 0.0625)
    out = mapper("depth", torch.rand(3, 1, h, w), torch.tensor([0, 1, 2]))
    assert out.shape[1:] == feature.shape[1:]


def test_xtc_attach_builds_the_chosen_mapper_and_its_groups():
    tasks = {k: FIVE[k] for k in ("semseg", "depth", "normals")}
    model = build_model(
        "resnet", HEADS3, width=0.0625, backbone=BackboneConfig(depth=18, output_stride=32)
    )
    method = build_method("xtc", tasks, {"mapper": "resnet18", "width": 0.0625})
    method.attach(model)
    mapper = method.loss_fn.mapper
    assert isinstance(mapper, ResNetJointSpaceMapper) and mapper.out_channels == 512
    groups = {g.name: g for g in method.optimizer_groups(model)}
    assert {id(p) for p in groups["film"].params} == {id(p) for p in mapper.film_parameters()}
    with pytest.raises(ConfigError, match=r"method\.options\.mapper"):
        build_method("xtc", tasks, {}).attach(model)
    with pytest.raises(ConfigError, match=r"method\.options\.mapper"):
        build_method("xtc", tasks, {"mapper": "vgg"})
