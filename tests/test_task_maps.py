"""direct_map and perceptual_map (paper 001, Sec. 3.2): losses, gradients, pairs, CLI.

Images are 32 x 64 rather than 32 x 48: a mapping runs on the sub-batch of images that need its
pair, often a single image, and a training-mode BatchNorm net needs a bottleneck of more than
one value per channel (32 x 48 pools down to 1 x 1). Comparisons against the per-image loop run
in eval mode, where a SegNet treats each image independently.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mtpsl.cli import main
from mtpsl.data import DATASETS
from mtpsl.data.batch import PartialLabelSet, collate
from mtpsl.methods import build_method
from mtpsl.methods.task_maps import pair_key
from mtpsl.models import HeadSpec, build_model
from mtpsl.tasks import DepthTask, NormalTask, SegmentationTask, build_task

from conftest import make_layout

H, W = 32, 64
TINY_MAP = {"mapping_width": 0.0625}
NAMES = ("semantic", "depth", "normal")
MIXED = [[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]]  # varied pair sets per image


@pytest.fixture(scope="module")
def nyu_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("maps"), n=6, h=H, w=W)


def _setup(root, labelled, method="direct_map", family="nyuv2", **options):
    torch.manual_seed(0)
    dataset = DATASETS.get(family)(root, "train")
    tasks = dict(dataset.tasks)
    rows = np.asarray(labelled, dtype=bool)
    items = PartialLabelSet(torch.utils.data.Subset(dataset, range(len(rows))), tasks, rows)
    batch = collate([items[i] for i in range(len(rows))], tuple(tasks))
    heads = {n: HeadSpec(t.out_channels, t.activate) for n, t in tasks.items()}
    model = build_model("segnet", heads, width=0.0625)
    return tasks, batch, model, build_method(method, tasks, {**TINY_MAP, **options})


@pytest.fixture
def soft_segmentation(monkeypatch):
    """Deterministic segmentation encoding (softmax) so both sides see the same input."""
    monkeypatch.setattr(SegmentationTask, "encode_pred", lambda self, pred: pred.exp())


def _calibrated_eval(tasks, batch, model, method):
    """Eval mode with BatchNorm statistics of one training pass (a fresh net's running stats
    leave tiny outputs, whose normalised normals are dominated by rounding)."""
    norms = [m for m in [*model.modules(), *method.modules()] if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass sets the batch statistics
    with torch.no_grad():
        preds = model(batch.image).preds
        for s, t in _pairs(tasks):
            method.mappings[pair_key(s, t)](tasks[s].encode_pred(preds[s]))
    model.eval()
    method.eval()


def _pairs(tasks):
    return [(s, t) for s in tasks for t in tasks if s != t]


def test_one_segnet_per_ordered_pair_with_the_encoded_input_channels(nyu_root):
    tasks, _, _, method = _setup(nyu_root, MIXED)
    assert len(method.mappings) == len(tasks) * (len(tasks) - 1) == 6
    assert set(method.mappings) == {pair_key(s, t) for s, t in _pairs(tasks)}
    expected_in = {"semantic": 13, "depth": 1, "normal": 3}
    for s, t in _pairs(tasks):
        net = method.mappings[pair_key(s, t)]
        assert net.encoder_block[0][0].in_channels == expected_in[s]
        assert net.tasks == [t]
        assert net.heads[t][1].out_channels == tasks[t].out_channels
    own = {id(p) for p in method.parameters()}
    assert all(id(p) in own for p in method.mappings.parameters())


def test_two_task_dataset_gets_two_mappings(tmp_path):
    root = make_layout(tmp_path, "cityscapes", n=2, h=H, w=W)
    _, batch, model, method = _setup(root, [[1, 0], [0, 1]], "perceptual_map", "cityscapes")
    assert sorted(method.mappings) == ["depth->semantic", "semantic->depth"]
    losses, _ = method.compute(model, batch)
    assert all(torch.isfinite(v) for v in losses.extra.values())


def test_direct_map_equals_a_per_image_per_pair_loop(nyu_root, soft_segmentation):
    tasks, batch, model, method = _setup(nyu_root, MIXED, weight=2.0)
    _calibrated_eval(tasks, batch, model, method)
    losses, _ = method.compute(model, batch)
    preds = model(batch.image).preds
    lab = batch.labelled
    expected = 0.0
    for i in range(len(batch)):
        for si, s in enumerate(NAMES):
            for ti, t in enumerate(NAMES):
                if s == t or lab[i, si] or not lab[i, ti]:
                    continue
                x = tasks[s].encode_pred(preds[s][i : i + 1])
                mapped = method.mappings[pair_key(s, t)](x).preds[t]
                expected += tasks[t].loss(mapped, batch.targets[t][i : i + 1])[0]
    expected = 2.0 * expected / len(batch)
    assert expected > 0
    torch.testing.assert_close(losses.extra["direct_map"], expected, rtol=1e-5, atol=0)
    assert set(losses.tasks) == set(NAMES)


def test_perceptual_map_equals_a_per_image_per_pair_loop(nyu_root, soft_segmentation):
    tasks, batch, model, method = _setup(nyu_root, MIXED, "perceptual_map", weight=3.0)
    _calibrated_eval(tasks, batch, model, method)
    losses, _ = method.compute(model, batch)
    preds = model(batch.image).preds
    lab = batch.labelled
    perceptual = fit = 0.0
    for i in range(len(batch)):
        for si, s in enumerate(NAMES):
            for ti, t in enumerate(NAMES):
                if s == t:
                    continue
                net = method.mappings[pair_key(s, t)]
                x = tasks[s].encode_pred(preds[s][i : i + 1])
                if lab[i, si]:
                    y = tasks[s].encode_target(batch.targets[s][i : i + 1])
                    perceptual += tasks[t].distance(net(x).preds[t], net(y).preds[t])[0]
                if lab[i, ti]:
                    fit += tasks[t].loss(net(x).preds[t], batch.targets[t][i : i + 1])[0]
    torch.testing.assert_close(
        losses.extra["perceptual"], 3.0 * perceptual / len(batch), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(losses.extra["map_fit"], fit / len(batch), rtol=1e-5, atol=0)
    assert perceptual > 0 and fit > 0


def test_gumbel_sampling_is_reproducible_under_the_same_seed(nyu_root):
    _, batch, model, method = _setup(nyu_root, MIXED)
    model.eval()
    method.eval()
    torch.manual_seed(5)
    a = method.compute(model, batch)[0].extra["direct_map"]
    torch.manual_seed(5)
    b = method.compute(model, batch)[0].extra["direct_map"]
    assert torch.equal(a, b)


def _grads(module):
    return [p.grad for p in module.parameters()]


def _nonzero(grads):
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def _zero(grads):
    return all(g is None or bool(g.abs().sum() == 0) for g in grads)


def test_direct_map_trains_the_mappings_and_the_network(nyu_root):
    _, batch, model, method = _setup(nyu_root, MIXED)
    losses, _ = method.compute(model, batch)
    losses.extra["direct_map"].backward()
    assert _nonzero(_grads(model))
    assert _nonzero(_grads(method.mappings[pair_key("depth", "semantic")]))
    assert _nonzero(_grads(method.mappings[pair_key("semantic", "normal")]))
    assert _zero(_grads(method.mappings[pair_key("depth", "normal")]))  # no image needs it


def test_perceptual_term_trains_the_network_not_the_mappings(nyu_root):
    _, batch, model, method = _setup(nyu_root, MIXED, "perceptual_map")
    losses, _ = method.compute(model, batch)
    losses.extra["perceptual"].backward()
    assert _zero(_grads(method))
    assert _nonzero(_grads(model))


def test_map_fit_trains_the_mappings_not_the_network(nyu_root):
    _, batch, model, method = _setup(nyu_root, MIXED, "perceptual_map")
    losses, _ = method.compute(model, batch)
    losses.extra["map_fit"].backward()
    assert _zero(_grads(model))
    for key, net in method.mappings.items():
        assert _nonzero(_grads(net)), key


def _count_calls(method):
    calls: dict[str, list[int]] = {k: [] for k in method.mappings}
    for key, net in method.mappings.items():
        net.register_forward_hook(lambda m, inp, out, key=key: calls[key].append(len(inp[0])))
    return calls


def test_fully_labelled_batch_has_no_direct_map_pairs(nyu_root):
    _, batch, model, method = _setup(nyu_root, [[1, 1, 1]] * 2)
    calls = _count_calls(method)
    losses, _ = method.compute(model, batch)
    assert losses.extra["direct_map"].item() == 0.0
    assert all(not c for c in calls.values())
    sum(losses.tasks.values()).backward()  # still a valid graph with the zero term


def test_onelabel_batch_has_t_minus_one_pairs_per_image(nyu_root):
    rows = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]]
    tasks, batch, model, method = _setup(nyu_root, rows)
    calls = _count_calls(method)
    method.compute(model, batch)
    per_target = np.asarray(rows).sum(0)
    for s, t in _pairs(tasks):
        # every image labelled only for t is in the sub-batch of each of its T-1 sources
        assert calls[pair_key(s, t)] == [per_target[NAMES.index(t)]]
    assert sum(sum(c) for c in calls.values()) == len(rows) * (len(tasks) - 1)


def test_perceptual_pairs_follow_the_source_and_fit_pairs_the_target(nyu_root):
    rows = [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    tasks, batch, model, method = _setup(nyu_root, rows, "perceptual_map")
    calls = _count_calls(method)
    method.compute(model, batch)
    counts = np.asarray(rows).sum(0)
    for s, t in _pairs(tasks):
        n_s, n_t = counts[NAMES.index(s)], counts[NAMES.index(t)]
        expected = ([n_s, n_s] if n_s else []) + ([n_t] if n_t else [])  # pred, gt, fit
        assert calls[pair_key(s, t)] == expected, (s, t)


def test_options_are_validated():
    tasks = {"depth": build_task("depth", "depth"), "normal": build_task("normal", "normal")}
    with pytest.raises(Exception, match="mapping_width"):
        build_method("direct_map", tasks, {"mapping_widht": 0.5})
    method = build_method("perceptual_map", tasks, {"mapping_width": 0.0625})
    assert method.options.weight == 1.0


def test_distance_on_hand_made_inputs():
    seg = SegmentationTask("semantic", num_classes=2)
    half = torch.full((2, 2, 1, 2), 0.5).log()
    ref = torch.tensor([[0.25, 1.0], [0.75, 0.0]]).expand(2, 2, 2).reshape(2, 2, 1, 2)
    ref = ref.clamp_min(1e-30).log()
    # every pixel: -(sum_c p_ref * log 0.5) = log 2 whatever the reference distribution
    torch.testing.assert_close(seg.distance(half, ref), torch.full((2,), math.log(2)))
    sharp = torch.tensor([[0.5, 1.0], [0.5, 1e-30]]).log().reshape(1, 2, 1, 2)
    onehot = torch.tensor([[1.0, 1.0], [1e-30, 1e-30]]).log().reshape(1, 2, 1, 2)
    torch.testing.assert_close(seg.distance(sharp, onehot), torch.tensor([math.log(2) / 2]))

    depth = DepthTask("depth")
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    twice = torch.cat([pred, pred * 2])
    torch.testing.assert_close(depth.distance(twice, torch.zeros_like(twice)),
                               torch.tensor([2.5, 5.0]))

    normal = NormalTask("normal")
    x, y = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    pred = torch.stack([x, x, x, x], dim=-1).reshape(1, 3, 2, 2)
    refs = torch.stack([x, y, -x, y], dim=-1).reshape(1, 3, 2, 2)  # 1-cos: 0, 1, 2, 1
    torch.testing.assert_close(normal.distance(pred, refs), torch.tensor([1.0]))
    torch.testing.assert_close(normal.distance(pred, pred), torch.tensor([0.0]))


TINY = ["model.width=0.0625", "train.epochs=1", "train.batch_size=2", "train.eval_every=1",
        "train.checkpoint_every=1", "train.progress=false", "optim.lr=1e-3"]


@pytest.mark.parametrize(
    ("method", "keys"),
    [("direct_map", ["direct_map"]), ("perceptual_map", ["perceptual", "map_fit"])],
)
def test_train_from_the_cli(nyu_root, tmp_path, method, keys):
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), f"dataset.root={nyu_root}", *TINY,
                 f"method.name={method}", "method.options={mapping_width: 0.0625, weight: 2.0}"])
    assert code == 0
    final = json.loads((run / "final_metrics.json").read_text())
    for key in ["semantic/miou", "depth/abs_err", "normal/mean"]:
        assert np.isfinite(final["metrics"][key])
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in keys:
        assert np.isfinite(row[f"train/{key}"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("mappings.depth->semantic.") for k in state["method"])


def _hand_cosine(name, a, b, target=None):
    """1 - cos of two flattened maps (segmentation: probabilities); against a label, over its
    valid pixels, the label one-hot for segmentation (by hand)."""
    if name == "semantic":
        a = a.exp()
        b = None if b is None else b.exp()
    if target is not None:
        if name == "semantic":
            valid = target >= 0
            b = torch.nn.functional.one_hot(target.clamp(min=0), a.shape[1])
            b = b.permute(0, 3, 1, 2).to(a.dtype)
        else:
            valid = (target != 0).any(1)
            b = target
        a, b = a * valid[:, None], b * valid[:, None]
    a, b = a.flatten(), b.flatten()
    return 1 - (a @ b) / (a.norm() * b.norm())


def _term(options, image_terms):
    total = sum(image_terms)
    return total / len(image_terms) if options["normalize"] == "mean" else total


OPTIONS = [{"normalize": "mean", "distance": "task"}, {"normalize": "sum", "distance": "cosine"},
           {"normalize": "mean", "distance": "cosine"}]


@pytest.mark.parametrize("options", OPTIONS)
def test_direct_map_options_equal_the_loop(nyu_root, soft_segmentation, options):
    """normalize=mean divides an image's pairs by their number (1/|U_n|); distance=cosine is
    the paper's L_ct between the mapped prediction and the label."""
    tasks, batch, model, method = _setup(nyu_root, MIXED, weight=2.0, **options)
    _calibrated_eval(tasks, batch, model, method)
    losses, _ = method.compute(model, batch)
    preds, lab = model(batch.image).preds, batch.labelled
    expected = 0.0
    for i in range(len(batch)):
        terms = []
        for si, s in enumerate(NAMES):
            for ti, t in enumerate(NAMES):
                if s == t or lab[i, si] or not lab[i, ti]:
                    continue
                x = tasks[s].encode_pred(preds[s][i : i + 1])
                mapped = method.mappings[pair_key(s, t)](x).preds[t]
                target = batch.targets[t][i : i + 1]
                terms.append(_hand_cosine(t, mapped, None, target) if options["distance"] ==
                             "cosine" else tasks[t].loss(mapped, target)[0])
        if terms:
            expected += _term(options, terms)
    expected = 2.0 * expected / len(batch)
    torch.testing.assert_close(losses.extra["direct_map"], expected, rtol=1e-5, atol=0)
    default = build_method("direct_map", tasks, {**TINY_MAP, "weight": 2.0})
    default.load_state_dict(method.state_dict())
    default.eval()
    assert not torch.allclose(default.compute(model, batch)[0].extra["direct_map"],
                              losses.extra["direct_map"])


@pytest.mark.parametrize("options", OPTIONS)
def test_perceptual_map_options_equal_the_loop(nyu_root, soft_segmentation, options):
    tasks, batch, model, method = _setup(nyu_root, MIXED, "perceptual_map", weight=3.0,
                                         **options)
    _calibrated_eval(tasks, batch, model, method)
    losses, _ = method.compute(model, batch)
    preds, lab = model(batch.image).preds, batch.labelled
    cosine = options["distance"] == "cosine"
    perceptual = fit = 0.0
    for i in range(len(batch)):
        p_terms, f_terms = [], []
        for si, s in enumerate(NAMES):
            for ti, t in enumerate(NAMES):
                if s == t:
                    continue
                net = method.mappings[pair_key(s, t)]
                x = tasks[s].encode_pred(preds[s][i : i + 1])
                mapped = net(x).preds[t]
                if lab[i, si]:
                    ref = net(tasks[s].encode_target(batch.targets[s][i : i + 1])).preds[t]
                    p_terms.append(_hand_cosine(t, mapped, ref) if cosine
                                   else tasks[t].distance(mapped, ref)[0])
                if lab[i, ti]:
                    target = batch.targets[t][i : i + 1]
                    f_terms.append(_hand_cosine(t, mapped, None, target) if cosine
                                   else tasks[t].loss(mapped, target)[0])
        perceptual += _term(options, p_terms) if p_terms else 0.0
        fit += _term(options, f_terms) if f_terms else 0.0
    torch.testing.assert_close(losses.extra["perceptual"], 3.0 * perceptual / len(batch),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(losses.extra["map_fit"], fit / len(batch), rtol=1e-5, atol=0)
