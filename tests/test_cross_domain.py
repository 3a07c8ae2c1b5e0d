"""The ``cross_domain`` dataset: union items, balanced batches from the real train loader,
per-source evaluation sets, the synthetic pair, and errors for bad ``domains`` options."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml

from mtpsl.cli import main
from mtpsl.core.config import load_config
from mtpsl.core.errors import ConfigError, DataError
from mtpsl.data import DATASETS
from mtpsl.data.cross_domain import domain_eval_sets
from mtpsl.data.synthetic import render_street
from mtpsl.engine.build import build_experiment, train_loader

from conftest import make_layout

H, W = 32, 48


def _domains(a_tasks=("semantic",), b_tasks=("depth",), **b_options):
    return [
        {
            "name": "cityscapes",
            "root": "a",
            "tasks": list(a_tasks),
            "label": "A",
            "options": {"num_classes": 7},
        },
        {
            "name": "cityscapes",
            "root": "b",
            "tasks": list(b_tasks),
            "label": "B",
            "options": {"num_classes": 7, **b_options},
        },
    ]


@pytest.fixture
def pair(tmp_path):
    """``tmp/a`` with 3 images and ``tmp/b`` with 5, random Cityscapes-layout data."""
    a = make_layout(tmp_path, "cityscapes", n=3, h=H, w=W, seed=1)
    b = make_layout(tmp_path, "cityscapes", n=5, h=H, w=W, seed=2)
    a.rename(tmp_path / "a")
    b.rename(tmp_path / "b")
    return tmp_path


def test_items_carry_the_union_domain_and_availability(pair):
    ds = DATASETS.get("cross_domain")(pair, "train", domains=_domains())
    assert len(ds) == 8 and ds.task_names == ("semantic", "depth")
    np.testing.assert_array_equal(ds.domain_ids, [0] * 3 + [1] * 5)
    first, last = ds[0], ds[7]
    assert first["domain"].item() == 0 and last["domain"].item() == 1
    assert first["available"].tolist() == [True, False]
    assert last["available"].tolist() == [False, True]
    assert (first["depth"] == 0).all() and (last["semantic"] == -1).all()  # blank targets
    source_b = DATASETS.get("cityscapes")(pair / "b", "train", tasks=("depth",))
    assert torch.equal(last["depth"], source_b[4]["depth"])
    assert torch.equal(last["image"], source_b[4]["image"])
    assert last["index"].item() == 7


def test_real_train_loader_draws_balanced_batches(pair):
    config = load_config(
        None,
        [
            "dataset.name=cross_domain",
            f"dataset.root={pair}",
            "labels.regime=full",
            "method.name=jtl",
            "train.batch_size=4",
            "model.width=0.0625",
        ],
    )
    config.dataset.options = {"domains": _domains()}
    exp = build_experiment(config)
    loader = train_loader(exp, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == 2  # the largest source (5 images) / 2 per batch, drop_last
    for batch in batches:
        assert sorted(batch.domain.tolist()) == [0, 0, 1, 1]
        a = batch.domain == 0
        assert batch.labelled_for("semantic").tolist() == a.tolist()
        assert batch.labelled_for("depth").tolist() == (~a).tolist()
        assert (batch.targets["semantic"][~a] == -1).all()
    # per-source evaluation sets, every task each source has on disk
    assert set(exp.extra_evals) == {"A", "B"}
    item = exp.extra_evals["A"][0]
    assert item["labelled"].tolist() == [True, True]


def test_eval_sets_leave_out_a_task_without_a_folder(pair):
    shutil.rmtree(pair / "a" / "val" / "depth")
    ds = DATASETS.get("cross_domain")(pair, "val", domains=_domains())
    sets = domain_eval_sets(pair, _domains(), "val", ds.tasks)
    assert sets["A"].available.any(0).tolist() == [True, False]
    assert sets["B"].available.any(0).tolist() == [True, True]
    explicit = _domains()
    explicit[1]["eval_tasks"] = ["depth"]
    assert domain_eval_sets(pair, explicit, "val", ds.tasks)["B"].available.any(0).tolist() == [
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("domains", "error", "match"),
    [
        (None, ConfigError, "dataset.options.domains: must be a list of at least 2"),
        ([{"name": "cityscapes", "root": "a", "tasks": ["semantic"]}], ConfigError, "at least 2"),
        ("a,b", ConfigError, "must be a list"),
        ([1, 2], ConfigError, r"domains\[0\]: must be a mapping"),
        (
            [
                {"name": "cityscapes", "root": "a", "tasks": ["semantic"], "colour": 1},
                {"name": "cityscapes", "root": "b", "tasks": ["depth"]},
            ],
            ConfigError,
            r"domains\[0\].colour: .*allowed keys: name, root, tasks",
        ),
        (
            [
                {"name": "cityscapes", "root": "a", "tasks": []},
                {"name": "cityscapes", "root": "b", "tasks": ["depth"]},
            ],
            ConfigError,
            r"domains\[0\].tasks",
        ),
        (
            [
                {"name": "kitti", "root": "a", "tasks": ["depth"]},
                {"name": "cityscapes", "root": "b", "tasks": ["depth"]},
            ],
            ConfigError,
            r"domains\[0\].name: unknown dataset 'kitti'",
        ),
        (
            [
                {"name": "cityscapes", "root": "a", "tasks": ["normal"]},
                {"name": "cityscapes", "root": "b", "tasks": ["depth"]},
            ],
            ConfigError,
            r"domains\[0\] \(cityscapes.*'normal'",
        ),
        (
            [
                {"name": "cityscapes", "root": "a", "tasks": ["semantic"], "label": "x"},
                {"name": "cityscapes", "root": "b", "tasks": ["depth"], "label": "x"},
            ],
            ConfigError,
            "must be distinct",
        ),
    ],
)
def test_bad_domains_options_are_named(pair, domains, error, match):
    with pytest.raises(error, match=match):
        DATASETS.get("cross_domain")(pair, "train", domains=domains)


def test_sources_must_agree_on_size_and_task_definitions(pair, tmp_path):
    with pytest.raises(DataError, match="task 'semantic' differs between source 0"):
        DATASETS.get("cross_domain")(
            pair, "train", domains=_domains(b_tasks=("semantic", "depth"), num_classes=19)
        )
    big = make_layout(tmp_path, "cityscapes", n=2, h=H, w=2 * W)
    domains = _domains()
    domains[1]["root"] = str(big)  # an absolute root is used as given
    with pytest.raises(DataError, match=r"same image size .*1 \(.*\): 32x96"):
        DATASETS.get("cross_domain")(pair, "train", domains=domains)


def test_cli_prints_a_domains_error_without_traceback(pair, tmp_path, capsys):
    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "r"),
            "dataset.name=cross_domain",
            f"dataset.root={pair}",
            "dataset.options.domains=[]",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset.options.domains") and "Traceback" not in err


def test_synth_pair_cli_renders_two_styles_of_different_scenes(tmp_path):
    out = tmp_path / "pair"
    assert (
        main(
            [
                "data",
                "synth",
                "--pair",
                "--layout",
                "cityscapes",
                "--out",
                str(out),
                "--n-train",
                "2",
                "--n-val",
                "1",
                "--height",
                str(H),
                "--width",
                str(W),
            ]
        )
        == 0
    )
    a = np.load(out / "domain_a" / "train" / "image" / "0.npy")
    b = np.load(out / "domain_b" / "train" / "image" / "0.npy")
    assert a.shape == b.shape == (H, W, 3)
    la = np.load(out / "domain_a" / "train" / "label_7" / "0.npy")
    lb = np.load(out / "domain_b" / "train" / "label_7" / "0.npy")
    assert not np.array_equal(la, lb)  # other scenes, not a restyle of the same ones


def test_style_b_is_a_real_appearance_gap_on_the_same_geometry():
    a, b = render_street(7, 48, 64, style="a"), render_street(7, 48, 64, style="b")
    for key in ("semantic", "depth", "normal"):
        np.testing.assert_array_equal(a[key], b[key])
    ia, ib = a["image"], b["image"]
    assert np.abs(ia - ib).mean() > 0.08  # colour, light, haze, vignetting
    assert ib.mean() < ia.mean()  # darker, hazier lighting
    # vignetting: the corners lose more brightness than the centre, relative to style a
    corner = ib[:6, :6].mean() / ia[:6, :6].mean()
    centre = ib[21:27, 29:35].mean() / ia[21:27, 29:35].mean()
    assert corner < centre


def test_unbalanceable_batch_size_is_a_config_error_and_leaves_no_run_folder(
    pair, tmp_path, capsys
):
    run = tmp_path / "runs" / "r"
    domains = yaml.safe_dump(_domains(), default_flow_style=True).strip()
    code = main(["train", "--run-dir", str(run), "dataset.name=cross_domain",
                 f"dataset.root={pair}", f"dataset.options.domains={domains}",
                 "labels.regime=full", "method.name=jtl", "train.batch_size=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.batch_size: 3 must be a multiple") and "(2)" in err
    assert not run.exists()
