"""HiTTs against its code (``Evergreen0929/EEMTL`` at ``a2c13c4``, folder ``HiTTs/``).

The code cannot enter this repository, so its loss is re-implemented here per image, from
``losses/loss_schemes.py`` (``SemiSupervisedMultiTaskTokenLoss.forward``, lines 220-268) and
``losses/loss_functions.py``, each function citing what it follows, and the batched method
is held to it in float64: the total and the gradient of every output, in stage 1 and in
stage 2 (with a teacher), on a batch with images labelled for every task, for one and for
none. A stand-in network whose parameters are its raw outputs replaces the model there (as in
``test_jtr_reference.py``); the model itself is checked by its own tests (its prompter and
decoder against the code's tensor layout, decoding, the parameter count from the code's
definitions, per-image independence, the code's quirks behind flags).
Then CLI training of both stages, a bitwise resume, the engine's teacher checks and
``compare``'s ``teacher_from`` chaining.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpsl.core.config import build_config
from mtpsl.core.errors import ConfigError
from mtpsl.data.batch import Batch, View
from mtpsl.methods import build_method
from mtpsl.models import HeadSpec, ModelOutput, build_model, count_parameters
from mtpsl.models.encoders import EncoderSpec
from mtpsl.models.hitts import NORMAL_CENTRES_CODE, centres_on_sphere, log_bins
from mtpsl.tasks import build_task

from conftest import TINY_TRAIN, assert_same_state

H, W, D, h, w = 8, 12, 4, 4, 6
BINS = log_bins(30, 0.67, 10.0).view(-1, 1)  # normal_clusters.py 74-76 (NYUv2: 30 bins)
CENTRES = torch.tensor(NORMAL_CENTRES_CODE, dtype=torch.float64)
CENTRES = CENTRES / CENTRES.norm(dim=1, keepdim=True)  # normal_clusters.py 61-64
WEIGHTS = {"semantic": 1.0, "depth": 0.6, "normal": 1.0}  # configs/nyud/hitts.yml loss_weights
THRESHOLDS = {"semantic": 0.2, "depth": 0.9, "normal": 0.95}  # cut the random outputs
LABELLED = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)


def _tasks() -> dict:
    return {"semantic": build_task("segmentation", "semantic", num_classes=13),
            "depth": build_task("depth", "depth", loss_weight=0.6),
            "normal": build_task("normal", "normal", loss_kind="l1")}


# ----------------------------------------------------------------------------- the code


def _ce(logits: Tensor, label: Tensor, valid: Tensor) -> Tensor:
    """loss_functions.py 27-66 ``CrossEntropyLoss``: mean over the non-ignored pixels."""
    ce = F.cross_entropy(logits, torch.where(valid, label, 0), reduction="none")
    return (ce * valid).sum() / max(int(valid.sum()), 1)


def _l1(out: Tensor, label: Tensor, valid: Tensor, normalize: bool) -> Tensor:
    """loss_functions.py 235-261 ``L1Loss``: normals normalised first; the sum over the
    valid pixels' channels divided by the number of valid pixels."""
    if normalize:
        out = F.normalize(out, p=2, dim=1)
    return ((out - label).abs() * valid).sum() / max(int(valid.sum()), 1)


def _oh_label(label: Tensor, task: str) -> Tensor:
    """loss_schemes.py 188-199 ``_get_oh_label``: nearest bin by |d - c|, most aligned
    centre by the dot product."""
    if task == "depth":
        return (label - BINS.view(1, -1, 1, 1)).abs().argmin(dim=1)
    return torch.einsum("bchw,kc->bkhw", label, CENTRES).argmax(dim=1)


def _pseudo(task: str, pred_t: Tensor, reg_t: Tensor | None, out: Tensor) -> Tensor:
    """loss_schemes.py 167-186 ``produce_pseudo_label`` and loss_functions.py 298-363
    ``Spatial_CrossEntropyLoss`` / ``Spatial_L1Loss`` (``* score`` then ``.mean()`` over all
    pixels and channels)."""
    thr = THRESHOLDS[task]
    if task == "semantic":
        prob = pred_t.exp()  # the code's softmax of logits; ours are log-probabilities
        label, score = prob.argmax(dim=1), prob.amax(dim=1, keepdim=True)
        ce = F.nll_loss(out, label, reduction="none")
        return (ce * (score > thr).double()).mean()
    score = F.softmax(reg_t * 5, dim=1).amax(dim=1, keepdim=True)
    score = score * (score > thr).double()
    if task == "normal":
        out = F.normalize(out, p=2, dim=1)
    return (F.l1_loss(out, pred_t, reduction="none") * score).mean()


def _code_total(student: dict, teacher: dict | None, labels: dict, labelled: Tensor) -> Tensor:
    """loss_schemes.py 220-268 for every image of the batch, ``loss_weights`` of the NYUv2
    config; ``student``/``teacher``: preds, bin logits, features and scores per task."""
    b, names = len(labelled), list(WEIGHTS)
    n = len(names)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(b):
        for k, task in enumerate(names):
            pred = student["preds"][task][i:i + 1]
            if labelled[i, k]:
                y = labels[task][i:i + 1]
                if task == "semantic":  # log-probs: their NLL is the CE of the logits
                    cur = _ce(pred, y, y >= 0) / b * n
                else:  # lines 239-243: the bin / centre classification joins the loss
                    valid = (y != 0).any(dim=1, keepdim=True)
                    cur = _l1(pred, y, valid, normalize=task == "normal") / b * n
                    reg = student["logits"][task][i:i + 1]
                    cur = cur + _ce(reg, _oh_label(y, task), valid[:, 0]) * 0.1 / b * n
                if teacher is None:
                    total = total + cur * WEIGHTS[task]
                else:  # lines 245-249: feat_loss (210-212), the MSE mean
                    f = F.mse_loss(student["feature"][task][i:i + 1],
                                   teacher["feature"][task][i:i + 1]) / b * n
                    total = total + cur * WEIGHTS[task] + f
            elif teacher is not None:  # lines 254-264
                reg_t = teacher["logits"].get(task)
                p = _pseudo(task, teacher["preds"][task][i:i + 1],
                            None if reg_t is None else reg_t[i:i + 1], pred) / b * n
                sq = (student["feature"][task][i:i + 1] - teacher["feature"][task][i:i + 1])
                f = (sq.pow(2) * teacher["score"][task][i:i + 1]).mean() / b * n
                total = total + p * WEIGHTS[task] + f
    return total


# ----------------------------------------------------------------------------- mtpsl


class _Outputs(nn.Module):
    """A stand-in network whose parameters are its raw outputs: segmentation logits, the
    depth bins' and normal centres' logits, each task's feature and score logit. It decodes
    as the hitts model (softmax expectation, normals re-normalised) at full size."""

    def __init__(self, tasks: dict, g: torch.Generator) -> None:
        super().__init__()
        self.tasks = tasks
        b = len(LABELLED)

        def p(*shape: int, s: float = 1.0) -> nn.Parameter:
            return nn.Parameter(s * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.raw = nn.ParameterDict({"semantic": p(b, 13, H, W, s=2.0),
                                     "depth": p(b, 30, H, W, s=2.0),
                                     "normal": p(b, 40, H, W, s=2.0)})
        self.feature = nn.ParameterDict({t: p(b, D, h, w) for t in tasks})
        self.score = nn.ParameterDict({t: p(b, 1, h, w) for t in tasks})
        self.books = {"depth": BINS, "normal": CENTRES}

    def codebook(self, name: str) -> Tensor | None:
        return self.books.get(name)

    def decoded(self) -> dict[str, Tensor]:
        preds = {"semantic": F.log_softmax(self.raw["semantic"], dim=1)}
        for name, book in self.books.items():
            value = torch.einsum("bkhw,kc->bchw", self.raw[name].softmax(dim=1), book)
            preds[name] = F.normalize(value, dim=1) if name == "normal" else value
        return preds

    def forward(self, images: Tensor) -> ModelOutput:
        preds = {k: self.tasks[k].activate(v) if k != "semantic" else v
                 for k, v in self.decoded().items()}
        feats = {f"hitts/feature/{t}": v for t, v in self.feature.items()}
        feats.update({f"hitts/score/{t}": torch.sigmoid(v) for t, v in self.score.items()})
        feats.update({f"hitts/logits/{t}": self.raw[t] for t in self.books})
        return ModelOutput(preds, feats)

    def as_code(self) -> dict:
        out = self(torch.zeros(1))
        return {"preds": out.preds,
                "logits": {t: self.raw[t] for t in self.books},
                "feature": dict(self.feature),
                "score": {t: torch.sigmoid(v) for t, v in self.score.items()}}


def _labels(g: torch.Generator) -> dict:
    b = len(LABELLED)
    seg = torch.randint(0, 13, (b, H, W), generator=g)
    seg[:, :2] = -1
    depth = torch.rand(b, 1, H, W, generator=g, dtype=torch.float64) * 9 + 0.7
    depth[..., :3] = 0.0
    normal = F.normalize(torch.randn(b, 3, H, W, generator=g, dtype=torch.float64), dim=1)
    normal[..., -2:, :] = 0.0
    full = {"semantic": seg, "depth": depth, "normal": normal}
    blank = {"semantic": torch.full_like(seg, -1), "depth": torch.zeros_like(depth),
             "normal": torch.zeros_like(normal)}
    return {t: torch.where(LABELLED[:, k].view(-1, *[1] * (full[t].ndim - 1)), full[t],
                           blank[t]) for k, t in enumerate(full)}


@pytest.mark.parametrize("stage", [1, 2])
def test_total_and_gradients_equal_the_code_per_image(stage):
    g = torch.Generator().manual_seed(stage)
    tasks = _tasks()
    student, teacher = _Outputs(tasks, g), _Outputs(tasks, g).requires_grad_(False)
    labels = _labels(g)
    options = {"thresholds": THRESHOLDS}
    if stage == 2:
        options.update(stage=2, teacher="unused: the test sets the teacher")
    method = build_method("hitts", tasks, options).double()
    method.teacher_net = teacher
    batch = Batch([View(torch.zeros(len(LABELLED), 3, H, W, dtype=torch.float64), labels)],
                  LABELLED, torch.arange(len(LABELLED)), tuple(tasks))
    losses, _ = method.compute(student, batch)
    total = sum(losses.tasks.values()) + sum(losses.extra.values())
    want = _code_total(student.as_code(), teacher.as_code() if stage == 2 else None, labels,
                       LABELLED)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=0.0)
    assert set(losses.extra) == (set() if stage == 1 else
                                 {"hitts_feature", "hitts_distill", "hitts_pseudo"})
    params = list(student.parameters())
    got = torch.autograd.grad(total, params, allow_unused=True)
    ref = torch.autograd.grad(want, params, allow_unused=True)
    for p, a, r in zip(params, got, ref, strict=True):
        a = torch.zeros_like(p) if a is None else a
        r = torch.zeros_like(p) if r is None else r
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-14)
    # the image labelled for nothing gets gradient from stage 2 only
    none = LABELLED.sum(1) == 0
    assert bool(got[0][none].abs().sum() > 0) == (stage == 2)


def test_thresholds_select_some_pixels_and_not_others():
    """The per-image test is only a test of the thresholds if they cut somewhere."""
    g = torch.Generator().manual_seed(2)
    teacher = _Outputs(_tasks(), g)
    out = teacher.as_code()
    conf = out["preds"]["semantic"].exp().amax(dim=1)
    assert 0 < (conf > THRESHOLDS["semantic"]).double().mean() < 1
    for t in ("depth", "normal"):
        c = F.softmax(out["logits"][t] * 5, dim=1).amax(dim=1)
        assert 0 < (c > THRESHOLDS[t]).double().mean() < 1


def test_options_are_validated_with_their_names():
    tasks = _tasks()
    with pytest.raises(ConfigError, match=r"method\.options\.teacher"):
        build_method("hitts", tasks, {"stage": 2})
    with pytest.raises(ConfigError, match=r"method\.options\.teacher"):
        build_method("hitts", tasks, {"teacher": "runs/a"})
    with pytest.raises(ConfigError, match=r"method\.options\.thresholds\.nope"):
        build_method("hitts", tasks, {"thresholds": {"nope": 0.5}})
    with pytest.raises(ConfigError, match=r"method\.options\.stage"):
        build_method("hitts", tasks, {"stage": 3})
    method = build_method("hitts", tasks, {"thresholds": {"depth": 0.95, "segmentation": 0.5},
                                           "pseudo_weights": {"normal": 0.5}})
    assert method.thresholds == {"semantic": 0.5, "depth": 0.95, "normal": 0.85}
    assert method.pseudo_weights == {"semantic": 1.0, "depth": 1.0, "normal": 0.5}
    pascal = {"edge": build_task("edge", "edge"), "sal": build_task("saliency", "sal")}
    method = build_method("hitts", pascal, {})
    assert method.thresholds == {"edge": 0.99, "sal": 0.7}
    assert method.pseudo_weights == {"edge": 0.05, "sal": 1.0}


# ----------------------------------------------------------------------------- the model


def _heads(tasks: dict) -> dict:
    return {n: HeadSpec.of(t) for n, t in tasks.items()}


def _model(width: float = 0.0625, **options):
    torch.manual_seed(0)
    return build_model("hitts", _heads(_tasks()), width=width,
                       backbone=EncoderSpec(depth=18, output_stride=32), **options)


def _code_parameters(classes: list[int], channels=(64, 128, 256, 512), dim: int = 256,
                     hidden: int = 128, backbone: int = 11_176_512) -> int:
    """Parameters of the code's ``MTMSPrompter`` counted from its definitions
    (``models/models.py`` 12-48 ``TaskTokenPrompt``, 143-167 ``MultiscaleTokenPrompt``,
    285-305 ``MTMSPrompter``; ``models/prompt_aspp.py`` 11-34 ``EmbeddedMlp``, 43-67
    ``TokenAttention``, 153-166 ``TaskSepcificPrompt``, 189-198 ``DeepLabHead``, and its
    ``ASPP`` at the end of the file) with ``TOKEN_DIM`` 256 (``utils/config.py``,
    ``create_config``) and torchvision's
    ResNet-18 without its classifier (11,176,512). Its task tokens are no parameter
    (``nn.Parameter(...).cuda()`` returns a plain tensor) and its bins, centres and one-hot
    indicators are plain tensors."""
    t = len(classes)
    n = backbone
    for c in channels:  # reduction conv (depthwise, bias), q and k, a conv-BN-ReLU per task
        n += 2 * c + 2 * (c * c + c) + t * (9 * c * c + c + 2 * c)
    n += t * sum(channels[-1] * c + c for c in channels)  # token_projector
    n += t * sum(c * dim + dim for c in channels)  # token_restore
    n += t * (sum(channels) * channels[-1] + channels[-1])  # combine_conv
    top = channels[-1]
    for k in classes:
        aspp = 2 * (top * dim + 2 * dim) + 3 * (9 * top * dim + 2 * dim) + 5 * dim * dim + 2 * dim
        attention = 3 * (dim * dim + dim) + 3 * 4 * dim + 2 * (dim * dim + dim) + 9 * dim * dim \
            + 3 * dim
        mlp = (k * hidden + 3 * hidden) + (hidden * hidden + 3 * hidden) + (hidden * k + k) \
            + (k * dim + dim)
        n += aspp + 9 * dim * dim + attention + 2 * dim + mlp + (dim * k + k) + (9 * k * k + k)
    return n


def _code_prompter(m, x: Tensor, tokens: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``models/models.py`` 91-106 ``TaskTokenPrompt.forward`` (reduction 1) with its helpers
    (64-89): tokens ``[1, C, 1]`` each, the affinity of ``[1, T, C]`` tokens, the features
    re-weighted through ``attn.repeat(B)`` and a ``[T, B, C, H, W]`` reshape."""
    b, c, hh, ww = x.shape
    d = m.reduce(x)
    feats = [x * torch.sigmoid((d * t.unsqueeze(-1)).sum(1, keepdim=True)) for t in tokens]
    toks = torch.cat(tokens, dim=-1).permute(0, 2, 1)
    attn = ((m.query(toks) @ m.key(toks).transpose(-2, -1)) * c ** -0.5).softmax(dim=-1)
    stacked = torch.cat([f.reshape(b, -1).unsqueeze(0) for f in feats]).permute(1, 0, 2)
    mixed = (attn.repeat(b, 1, 1) @ stacked).permute(1, 0, 2).reshape(len(tokens), b, c, hh, ww)
    new = (attn @ toks).permute(1, 2, 0)
    return [m.ffn[i](mixed[i]) for i in range(len(tokens))], [t.unsqueeze(0) for t in new]


def _code_decoder_tail(dec, feature: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
    """``prompt_aspp.py`` 69-92 ``TokenAttention.forward`` and 172-186
    ``TaskSepcificPrompt.forward`` with 36-41 ``EmbeddedMlp.forward``, token ``[1, D, 1]``."""
    att, pr = dec.attention, dec.prompt
    b, c, hh, ww = feature.shape
    tok = token.repeat(b, 1, 1)
    q, k, v = (lin(torch.cat([pool(feature).reshape(b, c, -1), tok], dim=-1).permute(0, 2, 1))
               for lin, pool in zip(att.qkv, att.pool, strict=True))
    x = ((q @ k.transpose(-2, -1)) * c ** -0.5).softmax(dim=-1) @ v
    x = x.transpose(1, 2)
    upd, ut = x[:, :, :-1], x[:, :, -1:]
    upd = att.restore_feature(upd.permute(0, 2, 1)).permute(0, 2, 1).reshape(b, c, hh // 2, ww // 2)
    feat = att.ffn(F.interpolate(upd, size=(hh, ww), mode="bilinear") + feature)
    ut = att.restore_token(ut.mean(0, keepdim=True).permute(0, 2, 1)).permute(0, 2, 1)
    score = torch.sigmoid((feat * ut.unsqueeze(-1)).sum(1, keepdim=True))
    kk = pr.embed.in_features
    onehot = torch.eye(kk, dtype=feat.dtype).unsqueeze(0)
    ct = pr.mlp(ut + pr.embed(onehot).permute(0, 2, 1))  # [1, D, K]
    ct = ct.permute(2, 0, 1).unsqueeze(-1).unsqueeze(-1)
    gate = (pr.reduce(feat).unsqueeze(0) * ct).sum(2).permute(1, 0, 2, 3)
    return pr.refine(pr.project(feat) * F.softplus(gate)), score


def test_prompter_and_decoder_equal_the_codes_layout(model):
    """The batched einsum forms against the code's reshapes and permutations, on one image
    (the code's batch-averaged token is the image's own there)."""
    x = torch.rand(1, 3, 16, 24, dtype=torch.float64)
    maps = model.trunk(x)
    scale = model.prompter.scales[1]
    toks = torch.randn(3, maps[1].shape[1], dtype=torch.float64)
    got_f, got_t = scale(maps[1], toks)
    want_f, want_t = _code_prompter(scale, maps[1], [t.view(1, -1, 1) for t in toks])
    for a, r in zip(got_f, want_f, strict=True):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(got_t, torch.cat([t.view(1, -1) for t in want_t]))
    fused, tokens = model.prompter(maps, model.tokens)
    dec = model.decoders["normal"]
    feature = dec.conv(dec.aspp(fused[2]))
    logits, _, score = dec(fused[2], tokens[2])
    want_logits, want_score = _code_decoder_tail(dec, feature, tokens[2].view(1, -1, 1))
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(score, want_score)


def test_parameter_count_equals_the_codes_definitions():
    """NYUv2 (13 classes, 30 depth bins, 40 normal centres): 42,054,158 in the code, counted
    from its definitions (``_code_parameters``); the same here with ``tokens: fixed`` (the
    code's untrained tokens), 3 x 512 more with learned tokens (the paper's)."""
    assert _code_parameters([13, 30, 40]) == 42_054_158
    with torch.device("meta"):
        fixed = _model(width=1.0, tokens="fixed")
    assert count_parameters(fixed) == 42_054_158
    assert fixed.tokens.numel() == 3 * 512  # a parameter when learned (the next test)
    # PASCAL-Context (21, 7 classes, saliency, edges, 40 centres): 62,099,388 in the code,
    # whose saliency head has 2 classes; mtpsl's saliency task has one channel
    assert _code_parameters([21, 7, 2, 1, 40]) == 62_099_388
    pascal = {"semantic": build_task("segmentation", "semantic", num_classes=21),
              "parts": build_task("segmentation", "parts", num_classes=7),
              "sal": build_task("saliency", "sal"), "edge": build_task("edge", "edge"),
              "normal": build_task("normal", "normal")}
    with torch.device("meta"):
        model = build_model("hitts", _heads(pascal), backbone=EncoderSpec(depth=18),
                            tokens="fixed")
    assert count_parameters(model) == _code_parameters([21, 7, 1, 1, 40])


@pytest.fixture(scope="module")
def model(one_thread):
    """One narrow hitts model (float64, eval mode) for the model's tests."""
    return _model().double().eval()


def test_decodes_bins_and_centres_and_exposes_the_features(model):
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    out = model(x)
    logits = out.features["hitts/logits/depth"]
    assert logits.shape == (2, 30, 16, 24) and out.features["hitts/logits/normal"].shape[1] == 40
    assert out.features["hitts/feature/semantic"].shape == (2, 16, 4, 6)
    assert out.features["hitts/score/depth"].shape == (2, 1, 4, 6)
    # the depth is the softmax expectation at stride 4, then resized (bilinear) to the input
    fused, tokens = model.prompter(model.trunk(x), model.tokens)
    logits4 = model.decoders["depth"](fused[1], tokens[1])[0]
    expectation = torch.einsum("bkhw,kc->bchw", logits4.softmax(1), BINS)
    up = {"size": (16, 24), "mode": "bilinear", "align_corners": False}
    torch.testing.assert_close(out.preds["depth"], F.interpolate(expectation, **up))
    torch.testing.assert_close(logits, F.interpolate(logits4, **up))
    book = model.codebook("depth")
    torch.testing.assert_close(book[:, 0], log_bins(30, 0.67, 10.0))
    assert book[0, 0] == pytest.approx(0.67) and book[-1, 0] == pytest.approx(10.0)
    assert model.codebook("semantic") is None
    # the depth is the expectation at stride 4, then resized (not the expectation of the
    # resized logits): the prediction stays within the bins' range
    assert out.preds["depth"].min() >= 0.67 - 1e-9 and out.preds["depth"].max() <= 10 + 1e-9
    torch.testing.assert_close(out.preds["normal"].norm(dim=1),
                               torch.ones(2, 16, 24, dtype=torch.float64))
    centres = model.codebook("normal")
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(40, dtype=torch.float64))
    assert centres[-1].tolist() == [0.0, 0.0, -1.0]


def test_per_image_token_makes_eval_predictions_independent_of_the_batch(model):
    """The code averages the fine-grained token over the batch (``prompt_aspp.py`` 90), so an
    image's prediction depends on its batch-mates even in eval mode; by default here it is
    the image's own (``token_batch_mean: true`` keeps the code's)."""
    x = torch.rand(3, 3, 16, 24, dtype=torch.float64)
    for batch_mean in (False, True):
        for decoder in model.decoders.values():
            decoder.attention.batch_mean = batch_mean
        alone = model(x[:1]).preds["semantic"]
        together = model(x).preds["semantic"][:1]
        assert torch.allclose(alone, together, rtol=0.0, atol=1e-12) != batch_mean
    for decoder in model.decoders.values():
        decoder.attention.batch_mean = False


def test_fixed_tokens_are_a_buffer_and_learned_ones_train(model):
    with torch.device("meta"):
        fixed = _model(tokens="fixed")
    assert "tokens" in dict(fixed.named_buffers())
    assert "tokens" not in dict(fixed.named_parameters())
    out = model(torch.rand(2, 3, 16, 24, dtype=torch.float64))
    assert isinstance(model.tokens, nn.Parameter)
    grad = torch.autograd.grad(sum(v.mean() for v in out.preds.values()), model.tokens)[0]
    assert grad.abs().sum() > 0
    assert any(p is model.tokens for p in model.shared_parameters())


def test_model_options_are_validated_with_their_names():
    for key, value in [("depth_head", "nope"), ("depth_bins", 1), ("depth_range", [2, 1]),
                       ("normal_centres", "kmeans"), ("normal_clusters", 12),
                       ("tokens", "nope"), ("aspp_rates", [1, 2])]:
        with pytest.raises(ConfigError, match=rf"model\.options\.{key}"):
            _model(**{key: value})
    with torch.device("meta"):
        direct = _model(depth_head="direct", normal_head="direct")
    assert direct.codebook("depth") is None and direct.codebook("normal") is None
    assert direct.decoders["depth"].prompt.refine.out_channels == 1
    spiral = centres_on_sphere("fibonacci", 12)
    assert spiral.shape == (12, 3)
    torch.testing.assert_close(spiral.norm(dim=1), torch.ones(12, dtype=torch.float64))
    assert (spiral @ spiral.T - torch.eye(12, dtype=torch.float64)).max() < 0.9  # spread


@pytest.mark.slow  # a five-head model
@pytest.mark.parametrize("kind", ["pascal", "cityscapes"])
def test_other_task_sets_train_both_stages(kind, one_thread):
    """PASCAL-Context's five tasks (binary saliency and edges: direct heads, confident hard
    pseudo-labels) and Cityscapes' two (disparity over the code's 50 bins in [0.01, 0.4922])."""
    import copy

    if kind == "pascal":
        tasks = {"semantic": build_task("segmentation", "semantic", num_classes=21),
                 "parts": build_task("segmentation", "parts", num_classes=7),
                 "sal": build_task("saliency", "sal"), "edge": build_task("edge", "edge"),
                 "normal": build_task("normal", "normal", loss_kind="l1")}
        options: dict = {}
    else:
        tasks = {"semantic": build_task("segmentation", "semantic", num_classes=7),
                 "depth": build_task("depth", "depth")}
        options = {"depth_bins": 50, "depth_range": [0.01, 0.4922]}
    torch.manual_seed(0)
    model = build_model("hitts", _heads(tasks), width=0.0625,
                        backbone=EncoderSpec(depth=18, output_stride=32), **options)
    named = {"parts": 0.85} if kind == "pascal" else {}
    method = build_method("hitts", tasks, {"stage": 2, "teacher": "set below",
                                           "thresholds": named})
    method.attach(model)
    assert method.thresholds.get("parts", 0.85) == 0.85
    method.teacher_net = copy.deepcopy(model).requires_grad_(False)
    b, size = 2, (16, 24)
    targets = {}
    for name, task in tasks.items():
        if task.label_dims == 0:
            targets[name] = torch.randint(0, task.out_channels, (b, *size))
        elif name == "normal":
            targets[name] = F.normalize(torch.randn(b, 3, *size), dim=1)
        elif name == "depth":
            targets[name] = torch.rand(b, 1, *size) * 0.4 + 0.02
        else:
            targets[name] = (torch.rand(b, 1, *size) > 0.5).float()
    labelled = torch.zeros(b, len(tasks), dtype=torch.bool)
    labelled[0, 0] = True
    batch = Batch([View(torch.rand(b, 3, *size), {
        n: torch.where(labelled[:, k].view(-1, *[1] * (t.ndim - 1)), t, tasks[n].blank_like(t))
        for k, (n, t) in enumerate(targets.items())})], labelled, torch.arange(b), tuple(tasks))
    losses, _ = method.compute(model, batch)
    terms = [*losses.tasks.values(), *losses.extra.values()]
    assert all(math.isfinite(float(t.detach())) for t in terms)
    assert float(losses.extra["hitts_distill"]) > 0
    sum(terms).backward()
    assert model.tokens.grad is not None


# ----------------------------------------------------------------------------- CLI, compare


def _args(root, *extra: str) -> list[str]:
    return ["--config", "synthetic_demo", f"dataset.root={root}", "model.name=hitts",
            "model.backbone.depth=18", "model.backbone.output_stride=32", "method.name=hitts",
            *TINY_TRAIN, "train.max_steps_per_epoch=2", "train.checkpoint_every=1",
            "train.eval_every=1", "train.device=cpu", *extra]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    from mtpsl.data.synthetic import write_nyuv2_layout

    return write_nyuv2_layout(tmp_path_factory.mktemp("data"), n_train=4, n_val=2, height=32,
                              width=48, progress=False)


@pytest.mark.slow
def test_both_stages_train_from_the_cli_and_stage_2_resumes_bitwise(layout, tmp_path):
    from mtpsl.cli import main
    from mtpsl.engine.checkpoint import load_checkpoint

    assert main(["train", "--run-dir", str(tmp_path / "s1"), *_args(layout)]) == 0
    two = _args(layout, "method.options.stage=2", f"method.options.teacher={tmp_path / 's1'}")
    assert main(["train", "--run-dir", str(tmp_path / "full"), *two, "train.epochs=2"]) == 0
    assert main(["train", "--run-dir", str(tmp_path / "part"), *two]) == 0
    assert main(["train", "--resume", str(tmp_path / "part"), "train.epochs=2"]) == 0
    teacher = load_checkpoint(tmp_path / "s1" / "checkpoint.pt")["model"]
    full = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    part = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    held = {k.removeprefix("teacher_net."): v for k, v in full["method"].items()}
    assert_same_state(held, teacher, "teacher")  # the stage-1 weights, unchanged by training
    for section in ("model", "method", "optim"):
        assert_same_state(full[section], part[section], section)
    rows = [json.loads(line)
            for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(rows[0][f"train/hitts_{k}"] > 0 for k in ("feature", "distill", "cls"))
    final = json.loads((tmp_path / "full" / "final_metrics.json").read_text())
    assert all(math.isfinite(v) for v in final["metrics"].values())


@pytest.mark.slow
def test_the_engine_refuses_an_unusable_teacher(layout, tmp_path, capsys):
    from mtpsl.cli import main

    assert main(["train", "--run-dir", str(tmp_path / "s1"), *_args(layout)]) == 0
    cases = [(str(tmp_path / "none"), "neither a run folder"),
             (str(tmp_path / "s1"), "another model config")]
    for teacher, message in cases:
        extra = ["model.options={token_dim: 128}"] if "model" in message else []
        config = _args(layout, "method.options.stage=2", f"method.options.teacher={teacher}",
                       *extra)
        capsys.readouterr()
        assert main(["train", "--run-dir", str(tmp_path / "s2"), *config]) != 0
        err = capsys.readouterr().err
        assert "method.options.teacher" in err and message in err
    (tmp_path / "s1" / "final_metrics.json").unlink()
    config = _args(layout, "method.options.stage=2", f"method.options.teacher={tmp_path / 's1'}")
    with pytest.raises(ConfigError, match="has not finished"):
        from mtpsl.core.config import load_config
        from mtpsl.engine.run import train

        train(load_config("synthetic_demo", config[2:]), tmp_path / "s3")


def _grid(layout, **variants) -> object:
    from mtpsl.core.config import load_config

    config = load_config("synthetic_demo", _args(layout)[2:])
    data = config.model_dump()
    data["compare"].update(methods=["hitts1", "hitts2"], regimes=["onelabel"], seeds=[0],
                           baseline="hitts1", contrasts=[],
                           variants={"hitts1": {"method": "hitts", "options": {}},
                                     "hitts2": {"method": "hitts", "options": {"stage": 2},
                                                **variants}})
    return data


def test_compare_fills_the_teacher_from_the_named_cell_and_orders_cells(layout, tmp_path):
    from mtpsl.analysis.grid import all_cells, cell_config_for, check_teachers

    data = _grid(layout)
    data["compare"]["methods"] = ["hitts2", "hitts1"]
    data["compare"]["variants"]["hitts2"]["options"]["teacher_from"] = "hitts1"
    config = build_config(data, "test")
    check_teachers(config)
    assert [c.method for c in all_cells(config)] == ["hitts1", "hitts2"]
    cell = cell_config_for(config, "onelabel", "hitts2", 0, out=tmp_path)
    assert cell.method.options == {"stage": 2,
                                   "teacher": str((tmp_path / "onelabel/hitts1/seed0").resolve())}
    assert cell_config_for(config, "onelabel", "hitts1", 0, out=tmp_path).method.options == {}
    for bad, message in [("hitts3", "has no cell in regime"), ("hitts2", "another method")]:
        data["compare"]["variants"]["hitts2"]["options"]["teacher_from"] = bad
        with pytest.raises(ConfigError, match=message):
            check_teachers(build_config(data, "test"))


@pytest.mark.slow
def test_compare_chains_stage_2_after_stage_1(layout, tmp_path):
    from mtpsl.analysis.compare import compare
    from mtpsl.engine.checkpoint import load_checkpoint

    data = _grid(layout)
    data["compare"]["variants"]["hitts2"]["options"]["teacher_from"] = "hitts1"
    config = build_config(data, "test")
    compare(config, tmp_path / "grid")
    student = tmp_path / "grid/onelabel/hitts2/seed0"
    saved = (student / "config.yaml").read_text()
    assert str((tmp_path / "grid/onelabel/hitts1/seed0").resolve()) in saved
    teacher = load_checkpoint(tmp_path / "grid/onelabel/hitts1/seed0/checkpoint.pt")["model"]
    held = load_checkpoint(student / "checkpoint.pt")["method"]
    assert_same_state({k.removeprefix("teacher_net."): v for k, v in held.items()}, teacher)
