"""JTR against its code (``KentoNishi/JTR-CVPR-2024`` at ``f6a2279``, folder ``code/``).

The code cannot be imported into this repository, so this module re-implements its loss per
image from the code's own definitions, each function citing the file and lines it follows, and
holds the batched method (``jtr`` with its default options) to it in float64: the total of a
training step and the gradients of every model output and auto-encoder parameter, for one-label,
random and full labels, on NYUv2's three tasks and Cityscapes' two. The auto-encoder's forward
is re-implemented too (train-mode BatchNorm at batch 1, as the code runs it), reading the
weights of the method's auto-encoder. Gumbel noise is the one thing replaced: both sides draw
from the same fixed noise per draw, so the straight-through samples are identical (the code
draws five independent samples per image; each gets its own noise here).

The options that keep mtpsl's earlier choices (``pred_mask=after_encoding``,
``recon_target=input``, ``recon_count=mask``) are tested at the end, each against the
definition it states.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.data.batch import Batch, View
from mtpsl.data.splits import make_split
from mtpsl.methods import build_method, jtr
from mtpsl.methods.jtr import JTRLoss, JTROptions
from mtpsl.models import ModelOutput
from mtpsl.tasks import build_task

H, W = 64, 96
MU, SD = 2.3618, 1.5876  # code/utils/process.py 5-6
W_DIST, W_RECON = 4.0, 2.0  # --dist-mtl-weight, --recon-weight (the method's defaults)
SETS = {
    "nyuv2": [("semantic", "segmentation", 13), ("depth", "depth", 1), ("normal", "normal", 3)],
    "cityscapes": [("semantic", "segmentation", 7), ("depth", "depth", 1)],
}
DRAWS = ("y_hat1", "fill1", "fill2", "recon_y2", "recon_y_hat2")


def _noise(draw: str, channels: int) -> Tensor:
    g = torch.Generator().manual_seed(DRAWS.index(draw) + 10 * channels)
    u = torch.rand(channels, H, W, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return -(-u.log()).log()  # Gumbel(0, 1)


def _gumbel(logits: Tensor, draw: str) -> Tensor:
    """code/utils/gumbel.py 41-56 (tau 1, hard, dim 1) with fixed noise per draw."""
    y_soft = (logits + _noise(draw, logits.shape[1])).softmax(1)
    index = y_soft.max(1, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def _sampler(task, pred, draw):
    """The method's hard sample (``task.encode_pred``) with the same noise for class maps
    (its predictions are log-probabilities; the softmax does not see the shift from the
    code's logits)."""
    return _gumbel(pred, draw) if task.label_dims == 0 else task.encode_pred(pred)


# ----------------------------------------------------------------------------- the code


def _phi(x: Tensor) -> Tensor:
    """process.py 8-12: ``Normal(2.3618, 1.5876).cdf``."""
    return 0.5 * (1.0 + torch.erf((x - MU) / (SD * math.sqrt(2.0))))


def _seg_pred(pred: Tensor, mask: Tensor, draw: str | None = None) -> Tensor:
    """process.py 19-20."""
    return (_gumbel(pred, draw) if draw else F.softmax(pred, dim=1)) * mask


def _depth_pred(pred: Tensor, mask: Tensor) -> Tensor:
    """process.py 23-24: masked before the transform."""
    return _phi(pred * mask)


def _normal_pred(pred: Tensor, mask: Tensor) -> Tensor:
    """process.py 27-28: masked before the transform."""
    return (pred * mask + 1.0) / 2.0


def _valid(kind: str, y: Tensor) -> Tensor:
    """process.py 31-44: ``y != -1`` for segmentation, ``sum over channels != 0`` else."""
    if kind == "segmentation":
        return (y != -1).unsqueeze(1)
    return (y.sum(1, keepdim=True) != 0)


def _mask(kinds, labels, labelled_tasks) -> Tensor:
    """process.py 47-63: the product of the labelled tasks' valid masks."""
    mask = torch.ones(1, 1, H, W, dtype=torch.float64)
    for k in labelled_tasks:
        mask = mask * _valid(kinds[k], labels[k])
    return mask


def _seg_gt(y: Tensor, classes: int) -> Tensor:
    """process.py 65-72: one-hot, zero at ignored pixels."""
    ignore = y == -1
    onehot = F.one_hot(torch.where(ignore, 0, y), classes).permute(0, 3, 1, 2).double()
    return onehot * ~ignore.unsqueeze(1)


def _depth_gt(y: Tensor) -> Tensor:
    """process.py 75-77."""
    return _phi(y * _valid("depth", y))


def _normal_gt(y: Tensor) -> Tensor:
    """process.py 80-81: not masked."""
    return (y + 1.0) / 2.0


def _size(x: Tensor) -> int:
    """process.py 84-86: non-zero elements, 1 if none."""
    size = int((x != 0).sum())
    return size if size != 0 else 1


def _recon_seg(x_pred: Tensor, x_out: Tensor, mask: Tensor) -> Tensor:
    """process.py 89-93."""
    bce = F.binary_cross_entropy_with_logits(x_pred, x_out.detach(), reduction="none")
    return (bce * mask).sum() / _size(x_out)


def _recon_depth(x_pred: Tensor, x_out: Tensor, mask: Tensor) -> Tensor:
    """process.py 96-100: the target goes through the transform here (again for Y_hat)."""
    size = _size(x_out)
    x_pred = (torch.sigmoid(x_pred) - 0.5) * (1 - 1e-5) + 0.5
    return ((x_pred - _phi(x_out.detach())).abs() * mask).sum() / size


def _recon_normal(x_pred: Tensor, x_out: Tensor, mask: Tensor) -> Tensor:
    """process.py 103-111: the target as given (raw for Y, encoded for Y_hat)."""
    size = _size(x_out)
    unit = x_pred / torch.norm(x_pred, p=2, dim=1, keepdim=True)
    return 1 - (unit * x_out.detach() * mask).sum() / size


def _layer(seq: nn.Module, x: Tensor, copy: bool) -> Tensor:
    """``conv_layer`` (nyuv2_segnet_jtr.py 92-103), train-mode BatchNorm of one image; a
    ``copy`` uses detached weights (the code's ``deepcopy``, lines 239-242)."""
    def w(p: Tensor) -> Tensor:
        return p.detach() if copy else p

    if isinstance(seq[0], nn.Conv2d):
        conv, norm = seq[0], seq[1]
        x = F.conv2d(x, w(conv.weight), w(conv.bias), padding=1)
        return F.relu(F.batch_norm(x, None, None, w(norm.weight), w(norm.bias), True, 0.0, 1e-5))
    for sub in seq:
        x = _layer(sub, x, copy)
    return x


def _forward(ae: nn.Module, x: Tensor, copy: bool = False, feat_only: bool = False):
    """SegNet_JTR.forward (nyuv2_segnet_jtr.py 105-142): latent = the 5th pooled map."""
    indices = []
    for i in range(5):
        x = _layer(ae.conv_block_enc[i], _layer(ae.encoder_block[i], x, copy), copy)
        x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
        indices.append(idx)
    feat = x
    if feat_only:
        return feat
    for i in range(5):
        x = F.max_unpool2d(x, indices[-i - 1], 2, 2)
        x = _layer(ae.conv_block_dec[-i - 1], _layer(ae.decoder_block[-i - 1], x, copy), copy)
    head = ae.heads["recon"]
    return feat, F.conv2d(F.conv2d(x, head[0].weight, head[0].bias, padding=1),
                          head[1].weight, head[1].bias)


def _encode_pred(kind, pred, mask, draw=None):
    return {"segmentation": lambda: _seg_pred(pred, mask, draw),
            "depth": lambda: _depth_pred(pred, mask),
            "normal": lambda: _normal_pred(pred, mask)}[kind]()


def _encode_gt(kind, y, classes):
    return {"segmentation": lambda: _seg_gt(y, classes), "depth": lambda: _depth_gt(y),
            "normal": lambda: _normal_gt(y)}[kind]()


def _jtr_losses(ae, kinds, classes, view1, view2, lab):
    """SegNet_JTR.compute_losses (nyuv2_segnet_jtr.py 144-294; cityscapes_segnet_jtr.py
    141-265 is the same without normals) for one image: (L_dist, L_recon)."""
    (p1, y1), (p2, y2) = view1, view2
    p1 = [p.detach() if k in lab else p for k, p in enumerate(p1)]  # lines 152-173
    p2 = [p.detach() if k in lab else p for k, p in enumerate(p2)]
    m1, m2 = _mask(kinds, y1, lab), _mask(kinds, y2, lab)
    t = range(len(kinds))
    y_hat_1 = torch.cat([_encode_pred(kinds[k], p1[k], m1, "y_hat1") for k in t], 1)
    y_1 = torch.cat([_encode_gt(kinds[k], y1[k], classes[k]) if k in lab
                     else _encode_pred(kinds[k], p1[k], m1, "fill1") for k in t], 1)
    y_hat_2 = torch.cat([_encode_pred(kinds[k], p2[k], m2) for k in t], 1)
    y_2 = torch.cat([_encode_gt(kinds[k], y2[k], classes[k]) if k in lab
                     else _encode_pred(kinds[k], p2[k], m2, "fill2") for k in t], 1)
    feat_y_1 = _forward(ae, y_1, copy=True, feat_only=True)
    feat_y_hat_1 = _forward(ae, y_hat_1, copy=True, feat_only=True)
    feat_y_2, recon_y_2 = _forward(ae, y_2.detach())
    feat_y_hat_2, recon_y_hat_2 = _forward(ae, y_hat_2.detach())
    r2, rh2 = torch.split(recon_y_2, classes, 1), torch.split(recon_y_hat_2, classes, 1)
    l_dist = (1 - F.cosine_similarity(feat_y_1, feat_y_hat_1, dim=1, eps=1e-12).mean()) + (
        W_RECON * (1 - F.cosine_similarity(feat_y_2, feat_y_hat_2, dim=1, eps=1e-12).mean()))
    l_recon = torch.zeros((), dtype=torch.float64)
    for k in t:  # lines 257-292: Y's terms, then Y_hat's
        if kinds[k] == "segmentation":
            target = (_seg_gt(y2[k], classes[k]) if k in lab
                      else _seg_pred(p2[k], m2, "recon_y2"))
            l_recon = l_recon + _recon_seg(r2[k], target, m2)
        else:
            fn = _recon_depth if kinds[k] == "depth" else _recon_normal
            l_recon = l_recon + fn(r2[k], y2[k] if k in lab else p2[k], m2)
    for k in t:
        if kinds[k] == "segmentation":
            l_recon = l_recon + _recon_seg(rh2[k], _seg_pred(p2[k], m2, "recon_y_hat2"), m2)
        elif kinds[k] == "depth":
            l_recon = l_recon + _recon_depth(rh2[k], _depth_pred(p2[k], m2), m2)
        else:
            l_recon = l_recon + _recon_normal(rh2[k], _normal_pred(p2[k], m2), m2)
    return l_dist, l_recon


def _supervised(kinds, preds, labels):
    """SegNet_MTL.compute_losses (nyuv2_segnet_mtl.py 148-180)."""
    out = []
    for kind, p, y in zip(kinds, preds, labels, strict=True):
        if kind == "segmentation":
            out.append(F.nll_loss(F.log_softmax(p, dim=1), y, ignore_index=-1))
            continue
        mask = _valid(kind, y).double()
        if kind == "depth":
            out.append(torch.sum(torch.abs(p - y) * mask) / torch.nonzero(mask).size(0))
        else:
            out.append(1 - torch.sum((p * y) * mask) / torch.nonzero(mask).size(0))
    return out


def _code_total(ae, kinds, classes, raw, labels, labelled):
    """train_nyuv2.py 131-181: per image ``L_sl / B + (4 L_dist + 2 L_recon) / B``, summed.
    ``raw[v][k]`` are the network's outputs of view v (normals before normalising)."""
    b = len(labelled)

    def head(v, k, i):
        x = raw[v][k][i:i + 1]
        return x / torch.norm(x, p=2, dim=1, keepdim=True) if kinds[k] == "normal" else x

    loss = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        lab = torch.nonzero(labelled[i]).squeeze(1).tolist()
        per_view = [([head(v, k, i) for k in range(len(kinds))],
                     [labels[v][k][i:i + 1] for k in range(len(kinds))]) for v in range(3)]
        sl = _supervised(kinds, *per_view[0])
        l_sl = sum(sl[k] for k in lab) / b
        l_dist, l_recon = _jtr_losses(ae, kinds, classes, per_view[1], per_view[2], lab)
        loss = loss + l_sl + (W_DIST * l_dist + W_RECON * l_recon) / b
    return loss


# ----------------------------------------------------------------------------- mtpsl


class _Outputs(nn.Module):
    """A stand-in network: its parameters are the raw outputs of every view, activated by the
    tasks as the real heads are."""

    def __init__(self, tasks, raw):
        super().__init__()
        self.tasks = tasks
        self.raw = nn.ParameterList([nn.Parameter(torch.cat([r[k] for r in raw]))
                                     for k in range(len(tasks))])

    def forward(self, images: Tensor) -> ModelOutput:
        preds = {name: task.activate(p) for (name, task), p in zip(self.tasks.items(), self.raw,
                                                                  strict=True)}
        return ModelOutput(preds, {})


def _case(set_name: str, regime: str, seed: int, b: int = 2):
    spec = SETS[set_name]
    tasks = {name: build_task(kind, name, **({"num_classes": c} if kind == "segmentation"
                                              else {})) for name, kind, c in spec}
    kinds = [kind for _, kind, _ in spec]
    classes = [c for _, _, c in spec]
    g = torch.Generator().manual_seed(seed)
    labelled = torch.as_tensor(make_split(regime, b, tuple(tasks), seed=seed).labelled)
    raw, labels = [], []
    for _ in range(3):
        raw.append([torch.randn(b, c, H, W, generator=g, dtype=torch.float64) for c in classes])
        view = []
        for k, (kind, c) in enumerate(zip(kinds, classes, strict=True)):
            if kind == "segmentation":
                y = torch.randint(0, c, (b, H, W), generator=g)
                y[:, :6] = -1
                blank = torch.full_like(y, -1)
            elif kind == "depth":
                y = torch.rand(b, 1, H, W, generator=g, dtype=torch.float64) * 5 + 0.3
                y[:, :, :, :9] = 0.0
                blank = torch.zeros_like(y)
            else:
                y = F.normalize(torch.randn(b, 3, H, W, generator=g, dtype=torch.float64), dim=1)
                y[:, :, -5:] = 0.0
                blank = torch.zeros_like(y)
            view.append(torch.where(labelled[:, k].view(-1, *[1] * (y.ndim - 1)), y, blank))
        labels.append(view)
    return tasks, kinds, classes, labelled, raw, labels


def _method_total(tasks, labelled, raw, labels, monkeypatch, **options):
    torch.manual_seed(0)
    method = build_method("jtr", tasks, {"ae_width": 0.125, **options}).double()
    model = _Outputs(tasks, raw).double()
    b = len(labelled)
    views = [View(torch.zeros(b, 3, H, W, dtype=torch.float64),
                  dict(zip(tasks, labels[v], strict=True))) for v in range(3)]
    batch = Batch(views, labelled, torch.arange(b), tuple(tasks))
    monkeypatch.setattr(jtr, "_hard_sample", _sampler)
    losses, _ = method.compute(model, batch)
    total = sum(losses.tasks.values()) + sum(losses.extra.values())
    return method, model, total


@pytest.mark.parametrize("regime", ["onelabel", "random", "full"])
@pytest.mark.parametrize("set_name", list(SETS))
def test_total_and_gradients_equal_the_code(set_name, regime, monkeypatch):
    tasks, kinds, classes, labelled, raw, labels = _case(set_name, regime, seed=3)
    method, model, total = _method_total(tasks, labelled, raw, labels, monkeypatch)
    ae = method.loss_fn.ae
    leaves = [[r[k].clone().requires_grad_(True) for k in range(len(kinds))] for r in raw]
    want = _code_total(ae, kinds, classes, leaves, labels, labelled)
    torch.testing.assert_close(total, want, rtol=1e-11, atol=0.0)

    params = list(ae.parameters())
    got = torch.autograd.grad(total, [*model.raw, *params], allow_unused=True)
    ref = torch.autograd.grad(want, [x for r in leaves for x in r] + params, allow_unused=True)
    n = len(kinds)
    for k in range(n):  # the model's outputs, views 0, 1, 2 (view 2 reaches nothing)
        parts = [ref[v * n + k] for v in range(3)]
        assert parts[2] is None
        joined = torch.cat([torch.zeros_like(raw[v][k]) if x is None else x
                            for v, x in enumerate(parts)])
        torch.testing.assert_close(got[k], joined, rtol=1e-8, atol=1e-13)
    for p, a, r in zip(params, got[n:], ref[3 * n:], strict=True):
        a = torch.zeros_like(p) if a is None else a
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-13)


def test_the_options_that_keep_mtpsls_earlier_choices_change_the_total(monkeypatch):
    tasks, _, _, labelled, raw, labels = _case("nyuv2", "onelabel", seed=4)
    totals = {}
    for key, value in [(None, None), ("pred_mask", "after_encoding"),
                       ("recon_target", "input"), ("recon_count", "mask")]:
        options = {} if key is None else {key: value}
        totals[key] = float(_method_total(tasks, labelled, raw, labels, monkeypatch,
                                          **options)[2].detach())
    assert len(set(totals.values())) == 4


# ----------------------------------------------------------------------------- the options


def _stacks(loss: JTRLoss, case, view: int = 1, pred_kind: str = "soft"):
    tasks, _, _, labelled, raw, labels = case
    preds = {name: task.activate(r) for (name, task), r in zip(tasks.items(), raw[view],
                                                                strict=True)}
    targets = dict(zip(tasks, labels[view], strict=True))
    return preds, targets, loss.stacks(preds, targets, labelled, pred_kind, _sampler, view)


def test_pred_mask_before_encoding_gives_masked_pixels_the_invalid_label_encoding():
    case = _case("nyuv2", "full", seed=5)
    loss = JTRLoss(case[0], JTROptions(ae_width=0.0625)).double()
    preds, targets, (y, y_hat, mask) = _stacks(loss, case)
    out = ~mask[0]
    assert out.any() and mask[0].any()
    invalid_depth = 0.5 * (1 + math.erf(-MU / SD / math.sqrt(2)))
    torch.testing.assert_close(y_hat[0, 13][out], torch.full_like(y_hat[0, 13][out],
                                                                   invalid_depth))
    assert (y_hat[0, 14:17][:, out] == 0.5).all()
    assert (y_hat[0, :13][:, out] == 0).all()
    # inside M: the encodings of the prediction; the label's invalid pixels encode the same
    torch.testing.assert_close(y_hat[0, 13][mask[0]], _phi(preds["depth"][0, 0][mask[0]]))
    invalid = targets["depth"][0, 0] == 0
    torch.testing.assert_close(y[0, 13][invalid], torch.full_like(y[0, 13][invalid],
                                                                   invalid_depth))
    after = JTRLoss(case[0], JTROptions(ae_width=0.0625, pred_mask="after_encoding")).double()
    _, _, (_, y_hat_after, _) = _stacks(after, case)
    assert (y_hat_after[0][:, out] == 0).all()
    torch.testing.assert_close(y_hat_after[0][:, mask[0]], y_hat[0][:, mask[0]])


def test_recon_count_nonzero_counts_the_targets_elements_and_mask_counts_m():
    """The code's denominators: an image without a depth label divides its depth terms by the
    prediction's non-zero pixels (all of them), not by M; normals count their 3 channels."""
    case = _case("nyuv2", "onelabel", seed=6)
    tasks, _, _, labelled, _, _ = case
    i = int(torch.nonzero(~labelled[:, 1])[0])  # an image without a depth label
    loss = JTRLoss(tasks, JTROptions(ae_width=0.0625)).double()
    preds, targets, (y, y_hat, mask) = _stacks(loss, case, view=2)
    preds = {k: v.detach() for k, v in preds.items()}
    _, counts = loss.recon_targets(preds, targets, labelled, mask, y, y_hat, _sampler)
    n = len(labelled)
    assert int(mask[i].sum()) < H * W
    assert counts[1][i] == H * W and counts[1][n + i] == H * W  # depth of Y and of Y_hat
    assert counts[2][n + i] == 3 * H * W  # normals of Y_hat: every channel of (n M + 1) / 2
    assert counts[0][n + i] == mask[i].sum()  # one-hot draws: one element per pixel of M
    by_mask = JTRLoss(tasks, JTROptions(ae_width=0.0625, recon_count="mask")).double()
    _, none = by_mask.recon_targets(preds, targets, labelled, mask, y, y_hat, _sampler)
    assert none == [None, None, None]


def test_recon_target_input_reconstructs_the_inputs_and_code_the_codes_targets():
    case = _case("nyuv2", "onelabel", seed=7)
    tasks, _, _, labelled, _, _ = case
    loss = JTRLoss(tasks, JTROptions(ae_width=0.0625, recon_target="input")).double()
    preds, targets, (y, y_hat, mask) = _stacks(loss, case, view=2)
    preds = {k: v.detach() for k, v in preds.items()}
    got, _ = loss.recon_targets(preds, targets, labelled, mask, y, y_hat, _sampler)
    torch.testing.assert_close(got, torch.cat([y, y_hat]))
    code = JTRLoss(tasks, JTROptions(ae_width=0.0625)).double()
    got, _ = code.recon_targets(preds, targets, labelled, mask, y, y_hat, _sampler)
    n = len(y)
    # Y_hat's depth target is its input encoded again; its normals (input + 1) / 2 (the
    # normal loss reads 2 t - 1, i.e. the encoded input itself, as the code's dot product)
    torch.testing.assert_close(got[n:, 13], _phi(y_hat[:, 13]))
    torch.testing.assert_close(got[n:, 14:], (y_hat[:, 14:] + 1) / 2)
    # Y_hat's segmentation target is a fresh draw, not its soft input
    torch.testing.assert_close(got[n:, :13], _gumbel(preds["semantic"], "recon_y_hat2")
                               * mask.unsqueeze(1))
    # Y's targets: raw depth / normals of the prediction where unlabelled, unmasked
    j = int(torch.nonzero(~labelled[:, 1])[0])
    torch.testing.assert_close(got[j, 13], _phi(preds["depth"][j, 0]))


def test_options_are_validated_with_their_names():
    tasks = _case("cityscapes", "onelabel", seed=0)[0]
    for key in ("pred_mask", "recon_target", "recon_count"):
        with pytest.raises(Exception, match=rf"method\.options\.{key}"):
            build_method("jtr", tasks, {key: "nope"})
