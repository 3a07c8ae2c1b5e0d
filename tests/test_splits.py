"""Partial-label regimes: seeded, balanced, saved and reloaded exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtpsl.core.errors import DataError
from mtpsl.data.splits import REGIMES, Split, make_split

from conftest import shared_dir

TASKS = ("semantic", "depth", "normal")


@pytest.mark.parametrize("regime", ["full", "onelabel", "random"])
def test_same_seed_same_split_other_seed_differs(regime):
    a = make_split(regime, 101, TASKS, seed=3)
    b = make_split(regime, 101, TASKS, seed=3)
    np.testing.assert_array_equal(a.labelled, b.labelled)
    if regime != "full":
        assert not np.array_equal(a.labelled, make_split(regime, 101, TASKS, seed=4).labelled)


@pytest.mark.parametrize("n", [795, 100, 7])
def test_onelabel_one_task_per_image_balanced_within_one(n):
    split = make_split("onelabel", n, TASKS, seed=0)
    assert (split.labelled.sum(1) == 1).all()
    counts = split.labelled.sum(0)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    if n == 795:
        assert counts.tolist() == [265, 265, 265]  # the reference's balance


def test_random_gives_between_one_and_all_but_one_task():
    split = make_split("random", 795, TASKS, seed=0)
    sizes = split.labelled.sum(1)
    assert sizes.min() == 1 and sizes.max() == len(TASKS) - 1
    assert 300 < (sizes == 1).sum() < 500  # roughly half, like the reference's 405 / 390


def test_random_needs_two_tasks():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        make_split("random", 10, ("depth",), seed=0)


def test_ratio_counts_follow_weights_exactly():
    split = make_split("ratio", 2975, ("semantic", "depth"), seed=0, ratios=[9, 1])
    assert (split.labelled.sum(1) == 1).all()
    assert split.counts() == {"semantic": 2678, "depth": 297}  # 2677.5 rounds up by remainder
    with pytest.raises(ValueError, match="ratios"):
        make_split("ratio", 10, ("semantic", "depth"), seed=0, ratios=[1, 2, 3])


def test_json_round_trip(tmp_path):
    split = make_split("random", 50, TASKS, seed=11)
    split.save(tmp_path / "split.json")
    loaded = Split.load(tmp_path / "split.json", TASKS)
    np.testing.assert_array_equal(loaded.labelled, split.labelled)
    assert (loaded.regime, loaded.seed) == ("random", 11)


def test_load_rejects_wrong_tasks_and_garbage(tmp_path):
    make_split("full", 5, TASKS, seed=0).save(tmp_path / "s.json")
    with pytest.raises(DataError, match="is for tasks"):
        Split.load(tmp_path / "s.json", ("semantic", "depth"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json"):
        Split.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(DataError, match="format"):
        Split.load(tmp_path / "other.json")
    with pytest.raises(DataError, match="does not exist"):
        Split.load(tmp_path / "missing.json")


def test_reference_pth_format(tmp_path):
    weights = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    torch.save({"labels_weights": weights}, tmp_path / "ref.pth")
    split = Split.load(tmp_path / "ref.pth", TASKS)
    np.testing.assert_array_equal(split.labelled, weights.numpy().astype(bool))
    with pytest.raises(DataError, match="3 task columns"):
        Split.load(tmp_path / "ref.pth", ("semantic", "depth"))
    torch.save({"other": 1}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match=r"labels_weights"):
        Split.load(tmp_path / "wrong.pth", TASKS)


def test_published_reference_splits_load():
    folder = shared_dir() / "data" / "reference-splits"
    if not folder.is_dir():
        pytest.skip("shared data not present")
    onelabel = Split.load(folder / "nyuv2_onelabel.pth", TASKS)
    assert onelabel.counts() == {"semantic": 265, "depth": 265, "normal": 265}
    random = Split.load(folder / "nyuv2_randomlabels.pth", TASKS)
    assert np.bincount(random.labelled.sum(1)).tolist() == [0, 405, 390]
    city = Split.load(folder / "cityscapes_onelabel.pth", ("semantic", "depth"))
    assert sorted(city.counts().values()) == [1487, 1488]


def test_every_regime_is_registered():
    assert {"full", "onelabel", "random", "ratio"} <= set(REGIMES.names())
