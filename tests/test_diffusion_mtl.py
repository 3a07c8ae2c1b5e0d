"""DiffusionMTL against its code (``prismformore/DiffusionMTL`` at ``65b84e7``).

The code cannot be imported here, so this module re-implements its training loss per image
from the code's own definitions (each function cites the file and lines it follows: the
denoiser with explicit attention, the schedule from its formulas, the per-image chain of
``MTDNet.forward``'s training branch, ``SemiSupervisedMultiTaskLoss``) and holds the batched
method to it in float64: the total and the gradient of every model parameter, with all tasks
labelled, one per image, a mix (one image without labels) and none. The encoder and the
BasicBlocks run batched on both sides, as in the code (train-mode BatchNorm over the batch);
the sampling noise is the one thing replaced: both sides read the same fixed draw per (image,
task, draw). A small stand-in encoder replaces ResNet-18 (not the method's part; in float64 it
would make every test slow); the CLI tests train the real one.

Parameter counts: the reference model was instantiated once (outside this repository, its
``utils.common_config.get_model`` with ``backbone: resnet18``, ``head: mlp``,
``num_timesteps: 2``, torch 2.x, timm 1.0) and counted with ``sum(p.numel())``; the numbers are
hard-coded below, and :func:`_hand_count` derives them again from the definitions.
"""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.cli import main
from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch, View
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.methods import build_method
from mtpsl.models import HeadSpec, build_model, count_parameters, diffusion_mtl
from mtpsl.models.diffusion_mtl import DiffusionMTLNet
from mtpsl.models.encoders import EncoderSpec
from mtpsl.tasks import build_task

from conftest import NYU_TASKS, TINY_TRAIN, assert_same_state

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 64, 96  # stride-8 map 8x12, attention tokens 2x3: the code's scale factors apply exactly
T_STEPS = 2
TASKS = NYU_TASKS
CASES = {
    "all": [[1, 1, 1], [1, 1, 1]],
    "one": [[1, 0, 0], [0, 0, 1]],
    "mixed": [[1, 0, 1], [0, 1, 0], [0, 0, 0]],
    "none": [[0, 0, 0], [0, 0, 0]],
}


class _Trunk(nn.Module):
    """A small stand-in for ResNet-18's four stages (strides 4 to 32): the encoder is not the
    method's, and ResNet-18 in float64 would make every test here slow."""

    channels = (8, 8, 16, 16)
    reductions = (4, 8, 16, 32)

    def __init__(self) -> None:
        super().__init__()
        ins, strides = (3, 8, 8, 16), (4, 2, 2, 2)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())
            for i, o, s in zip(ins, self.channels, strides, strict=True)])

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


def _net(tasks=TASKS, seed: int = 0, **options) -> DiffusionMTLNet:
    """The 1/16-width network (32 channels) on the small trunk."""
    torch.manual_seed(seed)
    heads = {n: HeadSpec.of(t) for n, t in tasks.items()}
    with mock.patch.object(diffusion_mtl, "build_encoder", lambda spec, c: _Trunk()):
        return build_model("diffusion_mtl", heads, width=0.0625, embed_dim=32, **options)


@pytest.fixture(scope="module")
def model() -> DiffusionMTLNet:
    return _net().double().train()


def _noise(i: int, task: str, draw: str, shape) -> Tensor:
    """The fixed draw of image ``i``, task, draw."""
    seed = 1000 * i + 10 * list(TASKS).index(task) + (0 if draw == "start" else int(draw[4:]) + 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _batched_noise(task: str, draw: str, rows, like: Tensor) -> Tensor:
    rows = range(len(like)) if rows is None else rows.tolist()
    return torch.stack([_noise(int(i), task, draw, like.shape[1:]) for i in rows])


def _batch(labelled: list[list[int]], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lab = torch.tensor(labelled, dtype=torch.bool)
    b = len(lab)
    seg = torch.randint(0, 13, (b, H, W), generator=g)
    seg[:, :5] = -1
    depth = torch.rand(b, 1, H, W, generator=g, dtype=torch.float64) * 4 + 0.5
    depth[..., :7] = 0.0
    normal = F.normalize(torch.randn(b, 3, H, W, generator=g, dtype=torch.float64), dim=1)
    normal[:, :, -4:] = 0.0
    targets = {}
    for k, (name, y) in enumerate(zip(TASKS, (seg, depth, normal), strict=True)):
        mask = lab[:, k].view(-1, *[1] * (y.ndim - 1))
        targets[name] = torch.where(mask, y, TASKS[name].blank_like(y))
    image = torch.randn(b, 3, H, W, generator=g, dtype=torch.float64)
    return Batch([View(image, targets)], lab, torch.arange(b), tuple(TASKS))


# ----------------------------------------------------------------------------- the code


def _schedule(steps: int) -> dict[str, Tensor]:
    """util.py 208-212 (linear: linspace of sqrt(beta), squared) and mtdnet.py 248-275."""
    betas = torch.linspace(1e-3 ** 0.5, 1e-2 ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    acp = torch.cumprod(alphas, 0)
    acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
    var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {"sqrt_acp": acp.sqrt(), "sqrt_1m_acp": (1.0 - acp).sqrt(),
            "coef1": betas * acp_prev.sqrt() / (1.0 - acp),
            "coef2": (1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
            "log_var": var.clamp(min=1e-20).log()}


def _t_embed(den, t: int) -> Tensor:
    """mtdnet.py 36-59: cos/sin of t * exp(-ln(1e4) i / 128), then Linear-SiLU-Linear."""
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    code = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])[None]
    lin0, lin2 = den.t_embed[0], den.t_embed[2]
    return F.linear(F.silu(F.linear(code, lin0.weight, lin0.bias)), lin2.weight, lin2.bias)


def _mlp(m, x: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, m[0].weight, m[0].bias)), m[2].weight, m[2].bias)


def _ln(norm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _cross_block(blk, x: Tensor, kv: Tensor, heads: int = 4) -> tuple[Tensor, Tensor]:
    """mtdnet.py 62-114: CrossBlock.forward(x, kv) with CrossAttention written out."""
    kv = kv + _mlp(blk.mlp_kv, _ln(blk.norm2_kv, kv))
    q_in, kv_in = _ln(blk.norm1, x), _ln(blk.norm_kv, kv)
    b, n, c = q_in.shape
    q = (q_in @ blk.attn.q.weight.T).reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)
    kvs = (kv_in @ blk.attn.kv.weight.T).reshape(b, kv.shape[1], 2, heads, c // heads)
    k, v = kvs.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    x = x + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
    x = x + _mlp(blk.mlp, _ln(blk.norm2, x))
    return x, kv


def _conv(m, x: Tensor) -> Tensor:
    return F.conv2d(x, m.weight, m.bias, padding=m.kernel_size[0] // 2)


def _denoise(den, task: str, feat: Tensor, noisy: Tensor, t: int, last: bool) -> Tensor:
    """mtdnet.py 158-196 for one task and one image; ``last`` = ``upsam`` (the final head)."""
    x = _conv(den.pre[task], noisy) + _t_embed(den, t)[:, :, None, None]
    x0 = x
    cur = F.interpolate(feat, scale_factor=0.25, mode="bilinear", align_corners=False)
    b, c, h, w = cur.shape
    kv = cur.reshape(b, c, -1).transpose(1, 2)
    x = F.interpolate(x, scale_factor=0.25, mode="bilinear", align_corners=False)
    x = x.reshape(b, c, -1).transpose(1, 2)
    for blk in den.blocks:
        kv, x = _cross_block(blk, kv, x)
    x = kv.reshape(b, h, w, c).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=4, mode="bilinear", align_corners=False) + x0
    r = den.refine[task]
    x = F.relu(_conv(r[5], F.relu(_conv(r[3], F.relu(_conv(r[1], _conv(r[0], x)))))))
    return _conv(den.heads[task], x) if last else x


def _chain(den, task: str, i: int, x_start: Tensor, feat: Tensor, steps: int
           ) -> tuple[Tensor, list[Tensor]]:
    """mtdnet.py 415-429 (training branch, image ``i``) and 321-366: q_sample at the last
    step, posterior samples down to step 1, the final step through the head. Returns the
    logits and every step's x0 (the final one before the head)."""
    s = _schedule(steps)
    last = steps - 1
    x = s["sqrt_acp"][last] * x_start + s["sqrt_1m_acp"][last] * _noise(i, task, "start",
                                                                       x_start.shape[1:])
    x0s = []
    for t in range(last, 0, -1):
        out = _denoise(den, task, feat, x, t, last=False)
        x0s.append(out)
        mean = s["coef1"][t] * out + s["coef2"][t] * x
        x = mean + (0.5 * s["log_var"][t]).exp() * _noise(i, task, f"step{t}", x.shape[1:])
    x0s.append(_denoise(den, task, feat, x, 0, last=False))
    return _conv(den.heads[task], x0s[-1]), x0s


def _code_total(net: DiffusionMTLNet, batch: Batch, steps: int = T_STEPS,
                inter_weight: float = 0.5, balance: bool = True, mse: float = 0.0) -> Tensor:
    """diffusion_net.py 29-58 and loss_schemes.py 30-62 (the loss weights 1: the tasks'
    own; ``mse`` adds p_losses, mtdnet.py 452-470, with the x0 target)."""
    x = batch.image
    maps = net.trunk(x)
    size = [int(s * 0.5) for s in maps[0].shape[2:]]
    fused = _conv(net.embed, torch.cat([F.interpolate(m, size=size, mode="bilinear",
                                                      align_corners=False) for m in maps], 1))
    feats = {t: net.inter[t](fused) for t in TASKS}
    inter = {t: _conv(net.inter_heads[t], feats[t]) for t in TASKS}
    cond = _conv(net.combine, torch.cat([v.detach() for v in inter.values()], 1))
    b, total = len(x), torch.zeros((), dtype=torch.float64)
    for i in range(b):
        sample = torch.zeros((), dtype=torch.float64)
        count = 0
        for k, (name, task) in enumerate(TASKS.items()):
            if not batch.labelled[i, k]:
                continue
            count += 1
            logits, x0s = _chain(net.denoiser, name, i,
                                 feats[name][i:i + 1], cond[i:i + 1], steps)
            target = batch.targets[name][i:i + 1]
            final = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
            mid = F.interpolate(inter[name][i:i + 1], (H, W), mode="bilinear",
                                align_corners=False)
            sample = sample + task.loss(task.activate(final), target)[0] / b
            sample = sample + inter_weight * task.loss(task.activate(mid), target)[0] / b
            clean = feats[name][i:i + 1].detach()
            total = total + mse * sum(F.mse_loss(x0, clean) for x0 in x0s) / b
        if count:
            total = total + sample * (len(TASKS) / count if balance else 1.0)
    return total


# ----------------------------------------------------------------------------- mtpsl


def _grads(net) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()]


def _method_total(net, batch, **options) -> Tensor:
    method = build_method("diffusion_mtl", TASKS, options).double()
    method.attach(net)
    method.noise = _batched_noise
    losses, _ = method.compute(net, batch)
    return sum(losses.tasks.values()) + sum(losses.extra.values(), torch.zeros(()))


@pytest.mark.parametrize("case", list(CASES))
def test_total_and_gradients_equal_the_code(model, case):
    batch = _batch(CASES[case])
    model.zero_grad(set_to_none=True)
    got = _method_total(model, batch)
    got.backward()
    mine = _grads(model)
    model.zero_grad(set_to_none=True)
    want = _code_total(model, batch)
    if want.requires_grad:
        want.backward()
    theirs = _grads(model)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    if case == "none":
        assert float(got.detach()) == 0.0 and all(not g.any() for g in mine)
    for name, a, b in zip([n for n, _ in model.named_parameters()], mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("options", [{"label_balance": "none", "inter_weight": 0.25},
                                     {"diffusion_loss": "mse", "diffusion_weight": 0.5}])
def test_the_options_equal_their_definitions(model, options):
    batch = _batch(CASES["mixed"], seed=1)
    got = _method_total(model, batch, **options)
    want = _code_total(model, batch, inter_weight=options.get("inter_weight", 0.5),
                       balance=options.get("label_balance") != "none",
                       mse=options.get("diffusion_weight", 0.0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_only_the_labelled_tasks_branches_are_trained(model):
    """An image labelled for semantic alone: depth's and normal's denoiser branches get no
    gradient (the code refines the labelled tasks only, mtdnet.py 409-415)."""
    batch = _batch([[1, 0, 0], [1, 0, 0]])
    model.zero_grad(set_to_none=True)
    _method_total(model, batch).backward()
    den = model.denoiser
    for task in ("depth", "normal"):
        for part in (den.pre[task], den.refine[task], den.heads[task]):
            assert all(p.grad is None for p in part.parameters()), task
    assert all(p.grad is not None for p in den.refine["semantic"].parameters())


def test_evaluation_samples_the_same_chain_for_every_task(model):
    """In eval mode the forward refines every task through the chain of the training branch
    (mtdnet.py 432-447): with the noise of image i it equals the per-image chain."""
    model.eval()
    try:
        batch = _batch(CASES["all"])
        out = model(batch.image, noise=_batched_noise)
        maps = model.trunk(batch.image)
        fused = model.fuse(maps)
        feats = {t: model.inter[t](fused) for t in TASKS}
        cond = model.combine(torch.cat([model.inter_heads[t](feats[t]) for t in TASKS], 1))
        for name, task in TASKS.items():
            for i in range(len(batch)):
                logits, _ = _chain(model.denoiser, name, i, feats[name][i:i + 1],
                                   cond[i:i + 1], T_STEPS)
                want = task.activate(F.interpolate(logits, (H, W), mode="bilinear",
                                                   align_corners=False))
                torch.testing.assert_close(out.preds[name][i:i + 1], want, rtol=1e-10,
                                           atol=1e-12)
        assert not any(k.startswith("inter/") for k in out.features)
    finally:
        model.train()


def test_evaluation_noise_repeats_and_leaves_the_global_stream(model):
    """``eval_seed`` (default 0): the same predictions at every evaluation forward, and the
    global generator, which training draws from, untouched."""
    image = _batch(CASES["all"]).image
    model.eval()
    try:
        with torch.no_grad():
            state = torch.get_rng_state()
            first = model(image).preds
            assert torch.equal(torch.get_rng_state(), state)
            second = model(image).preds
        model.eval_seed = None  # the code: the global stream
        with torch.no_grad():
            third = model(image).preds
        assert not torch.equal(torch.get_rng_state(), state)
    finally:
        model.eval_seed = 0
        model.train()
    for name in TASKS:
        assert torch.equal(first[name], second[name])
        assert not torch.equal(first[name], third[name])


def test_more_timesteps_follow_the_code(model):
    """Three steps (two posterior samples) against the per-image chain."""
    net = _net(seed=1, timesteps=3).double()
    batch = _batch(CASES["mixed"], seed=2)
    got = _method_total(net, batch)
    torch.testing.assert_close(got, _code_total(net, batch, steps=3), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- sizes


CODE_PARAMETERS = {
    # task output channels as the code's PASCAL config / MTAN layouts give them: count
    ("semseg", 21, "human_parts", 7, "sal", 2, "edge", 1, "normals", 3): 132_913_284,
    ("semseg", 13, "depth", 1, "normals", 3): 94_531_170,
    ("semseg", 7, "depth", 1): 75_337_296,
}


def _hand_count(channels: list[int], d: int = 512) -> int:
    """The reference's parameters from its definitions (dim d = ResNet-18's last width)."""
    backbone = 11_689_512 - (512 * 1000 + 1000)  # torchvision ResNet-18 without its fc
    embed = (64 + 128 + 256 + 512) * d * 9 + d  # diffusion_net.py 18
    basic = 2 * (d * d * 9) + 2 * 2 * d  # resnet.py 39-58: two convs, two BNs
    per_task = [2 * basic + (d * c + c)  # diffusion_net.py 19-20
                + (d * d * 9 + d)  # pre_layer, mtdnet.py 125
                + (d * d + d) + (d * 512 * 9 + 512) + (512 * d * 9 + d) + (d * d * 9 + d)
                + (d * c + c) for c in channels]  # task_heads, final_task_heads
    mlp = 2 * (d * 4 * d + 4 * d + 4 * d * d + d)
    block = 4 * 2 * d + (d * d + 2 * d * d + d * d + d) + mlp  # mtdnet.py 91-114
    t_embed = 256 * d + d + d * d + d
    combine = sum(channels) * d * 9 + d  # mtdnet.py 299
    return backbone + embed + sum(per_task) + 4 * block + t_embed + combine


@pytest.mark.parametrize("spec", list(CODE_PARAMETERS))
def test_parameter_count_equals_the_codes(spec):
    channels = list(spec[1::2])
    heads = {name: HeadSpec(c, torch.nn.Identity()) for name, c in zip(spec[::2], channels,
                                                                       strict=True)}
    with torch.device("meta"):
        net = build_model("diffusion_mtl", heads, backbone=EncoderSpec(depth=18,
                                                                     output_stride=32))
    assert count_parameters(net) == CODE_PARAMETERS[spec] == _hand_count(channels)


# ----------------------------------------------------------------------------- config


def test_other_models_and_bad_options_are_refused():
    method = build_method("diffusion_mtl", TASKS, {})
    heads = {n: HeadSpec.of(t) for n, t in TASKS.items()}
    with pytest.raises(ConfigError, match=r"model\.name.*diffusion_mtl"):
        method.attach(build_model("segnet", heads, width=0.0625))
    with pytest.raises(ConfigError, match=r"method\.options\.diffusion_loss"):
        build_method("diffusion_mtl", TASKS, {"diffusion_loss": "l1"})
    with pytest.raises(ConfigError, match=r"model\.options\.attn_heads"):
        build_model("diffusion_mtl", heads, width=0.0625, attn_heads=3,
                    backbone=EncoderSpec(depth=18, output_stride=32))
    with pytest.raises(ConfigError, match=r"model\.options\.timesteps"):
        build_model("diffusion_mtl", heads, timesteps=0)


def test_odd_sizes_and_a_pascal_task_set_run():
    """Sizes whose stride-8 map is not a multiple of 4 (the code would fail) and PASCAL's
    task types (saliency, edges) through the method."""
    tasks = {"semantic": build_task("segmentation", "semantic", num_classes=5),
             "saliency": build_task("saliency", "saliency"),
             "edges": build_task("edge", "edges")}
    net = _net(tasks)
    lab = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    image = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        preds = net(image).preds
    targets = {n: t.hard_label(p) for (n, t), p in zip(tasks.items(), preds.values(),
                                                      strict=True)}
    method = build_method("diffusion_mtl", tasks, {})
    method.attach(net)
    losses, out = method.compute(net, Batch([View(image, targets)], lab, torch.arange(2),
                                            tuple(tasks)))
    assert all(torch.isfinite(v) for v in losses.tasks.values())
    assert out.preds["semantic"].shape == (2, 5, 40, 56)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # two tiny CLI runs and a resume of ResNet-18 trunks (~10 s)
def test_trains_from_the_cli_and_resumes_bitwise(tmp_path):
    from mtpsl.data.synthetic import write_nyuv2_layout

    root = write_nyuv2_layout(tmp_path / "data", n_train=4, n_val=2, height=32, width=48,
                              progress=False)
    args = ["--config", "synthetic_demo", f"dataset.root={root}", "method.name=diffusion_mtl",
            "model.name=diffusion_mtl", "model.backbone.depth=18",
            "model.backbone.output_stride=32", "labels.regime=random", *TINY_TRAIN,
            "train.max_steps_per_epoch=2", "train.checkpoint_every=1", "train.device=cpu",
            "train.eval_every=1"]  # an eval loader draws its seed from the global RNG: both
    # runs must evaluate after epoch 1 to draw alike
    assert main(["train", "--run-dir", str(tmp_path / "full"), *args, "train.epochs=2"]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "part"), *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    for section in ("model", "method", "optim", "rng"):
        assert_same_state(full[section], part[section], section)
    rows = [json.loads(line) for line in
            (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("train/inter_") for k in rows[0])
    assert all(math.isfinite(v) for k, v in rows[-1].items()
               if k.startswith("eval/") and isinstance(v, float) and "/" in k[5:])


def test_a_segnet_run_is_refused_naming_the_model_key(tmp_path, tiny_root, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"dataset.root={tiny_root}",
                 "method.name=diffusion_mtl", *TINY_TRAIN])
    assert code != 0
    assert "model.name=diffusion_mtl" in capsys.readouterr().err


@pytest.mark.slow  # a CLI run with a ResNet-18 trunk (~5 s)
def test_trains_on_cross_domain_data(tmp_path):
    """Two Cityscapes-layout sources, one labelling segmentation and one depth (SemiMTL's
    setting): each image refines the task its source labels."""
    import yaml

    from conftest import final_metrics, make_layout

    for name, n, seed in (("a", 2, 1), ("b", 2, 2)):
        make_layout(tmp_path, "cityscapes", n=n, h=32, w=48, seed=seed).rename(tmp_path / name)
    domains = yaml.safe_dump([
        {"name": "cityscapes", "root": root, "tasks": [task], "label": root.upper(),
         "options": {"num_classes": 7}} for root, task in (("a", "semantic"), ("b", "depth"))],
        default_flow_style=True).strip()
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "dataset.name=cross_domain",
                 f"dataset.root={tmp_path}", f"dataset.options.domains={domains}",
                 "labels.regime=full", "method.name=diffusion_mtl", "model.name=diffusion_mtl",
                 "model.backbone.depth=18", "model.backbone.output_stride=32", *TINY_TRAIN,
                 "train.device=cpu"]) == 0
    final = final_metrics(run)
    assert {"metrics@A", "metrics@B"} <= set(final)
    assert math.isfinite(final["metrics"]["depth/abs_err"])
