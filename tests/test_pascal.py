"""PASCAL-Context: loader on a fabricated layout (real .jpg/.png/.mat files), its errors,
reference-format splits, the synthetic five-task data and the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from mtpsl.cli import main
from mtpsl.core.errors import DataError
from mtpsl.data import DATASETS
from mtpsl.data.pascal import PASCAL_TASKS, edges_from_labels, pascal_tasks
from mtpsl.data.splits import Split
from mtpsl.data.synthetic import render_indoor, render_pascal, render_street
from mtpsl.data.transforms import build_train_transform

from conftest import TINY_TRAIN

SIZES = {"a": (10, 14), "b": (12, 9), "c": (8, 8)}  # (h, w) per image id


def _person(h: int, w: int) -> dict:
    mask = np.zeros((h, w), np.uint8)
    mask[1:7, 2:6] = 1
    head, torso = np.zeros_like(mask), np.zeros_like(mask)
    head[1:3, 3:5] = 1
    torso[3:7, 2:6] = 1
    parts = np.array(
        [{"part_name": "head", "mask": head}, {"part_name": "torso", "mask": torso}], dtype=object
    )
    return {"class": "person", "class_ind": 15, "mask": mask, "parts": parts}


def fabricate(root: Path) -> Path:
    """Three images: 'a' has a person with parts, 'b' an annotation without people, 'c' no
    parts file at all. Labels are deterministic functions of the position."""
    for folder in [
        "JPEGImages",
        "semseg/pascal-context",
        "human_parts",
        "normals_distill",
        "sal_distill",
        "pascal-context/trainval",
        "ImageSets/Context",
    ]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (h, w) in SIZES.items():
        yy, xx = np.mgrid[:h, :w]
        rgb = np.stack([yy * 20, xx * 15, np.full((h, w), 100)], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        sem = ((yy + xx) % 21).astype(np.uint8)
        sem[0, 0] = 255
        Image.fromarray(sem).save(root / "semseg/pascal-context" / f"{image_id}.png")
        normal = np.zeros((h, w, 3), np.uint8)
        normal[..., 2] = 255  # n = (-1, -1, 1) / sqrt(3)
        normal[0, :] = 0  # first row: no label
        Image.fromarray(normal).save(root / "normals_distill" / f"{image_id}.png")
        sal = np.where(xx < w // 2, 200, 30).astype(np.uint8)
        Image.fromarray(sal).save(root / "sal_distill" / f"{image_id}.png")
        savemat(
            root / "pascal-context/trainval" / f"{image_id}.mat",
            {"LabelMap": (yy >= h // 2).astype(np.uint16) + 1},
        )
    h, w = SIZES["a"]
    objects = np.array(
        [
            _person(h, w),
            {
                "class": "chair",
                "class_ind": 9,
                "mask": np.ones((h, w), np.uint8),
                "parts": np.zeros((0, 0)),
            },
        ],
        dtype=object,
    )
    savemat(root / "human_parts" / "a.mat", {"anno": {"imname": "a", "objects": objects}})
    h, w = SIZES["b"]
    chair_only = np.array(
        [
            {
                "class": "chair",
                "class_ind": 9,
                "mask": np.ones((h, w), np.uint8),
                "parts": np.zeros((0, 0)),
            }
        ],
        dtype=object,
    )
    savemat(root / "human_parts" / "b.mat", {"anno": {"imname": "b", "objects": chair_only}})
    (root / "ImageSets/Context/train.txt").write_text("a\nb\nc\n")
    (root / "ImageSets/Context/val.txt").write_text("c\na\n")
    return root


@pytest.fixture()
def layout(tmp_path):
    return fabricate(tmp_path / "pascal")


def _open(root, split="train", **kw):
    return DATASETS.get("pascal_context")(root, split, **kw)


def test_items_decode_and_pad(layout):
    ds = _open(layout, size=[16, 16])
    assert ds.image_ids == ["a", "b", "c"] and ds.task_names == PASCAL_TASKS
    a, b, c = ds[0], ds[1], ds[2]
    assert a["available"].tolist() == [True, True, True, True, True]
    assert b["available"].tolist() == [True, False, True, True, True]  # no person in b.mat
    assert c["available"].tolist() == [True, False, True, True, True]  # no parts file
    h, w = SIZES["a"]
    assert a["image"].shape == (3, 16, 16) and (a["image"][:, h:, :] == 0).all()
    yy, xx = np.mgrid[:h, :w]
    sem = (yy + xx) % 21
    sem[0, 0] = -1
    np.testing.assert_array_equal(a["semantic"][:h, :w].numpy(), sem)
    assert (a["semantic"][h:] == -1).all() and (a["semantic"][:, w:] == -1).all()
    parts = a["parts"][:h, :w].numpy()
    assert parts[1, 3] == 1 and parts[4, 3] == 2 and parts[9, 13] == 0
    assert (a["parts"][h:] == -1).all() and (b["parts"] == -1).all()
    n = a["normal"][:, :h, :w]
    assert (n[:, 0] == 0).all()  # (0,0,0) png = no label
    torch.testing.assert_close(n[:, 1:].norm(dim=0), torch.ones(h - 1, w))
    assert n[2, 1, 0] > 0.5 and n[0, 1, 0] < -0.5
    np.testing.assert_array_equal(a["saliency"][0, :h, :w].numpy(), (xx < w // 2) * 1.0)
    assert (a["saliency"][0, h:] == -1).all()
    np.testing.assert_array_equal(a["edges"][0, :h, :w].numpy(), (yy == h // 2 - 1) * 1.0)
    assert (a["edges"][0, :, w:] == -1).all()
    assert a["index"] == 0


def test_normal_validity_from_the_file_or_from_the_label_map(layout):
    """A pre-masked file: (0, 0, 0) is no label. A raw file (a vector at every pixel, as the
    benchmark's): every pixel valid by default; with ``normal_classes`` only where the LabelMap
    class is listed (class 2 is the lower half of every image, class 1 the upper half)."""
    h, w = SIZES["a"]
    masked = _open(layout, size=None)[0]["normal"]
    assert (masked[:, 0] == 0).all() and (masked[:, 1:].norm(dim=0) > 0.99).all()
    raw = np.zeros((h, w, 3), np.uint8)
    raw[..., 2] = 255
    Image.fromarray(raw).save(layout / "normals_distill" / "a.png")
    from_file = _open(layout, size=None)[0]["normal"]
    assert (from_file.norm(dim=0) > 0.99).all()
    by_class = _open(layout, size=None, normal_classes=[2])[0]["normal"]
    lower = np.arange(h) >= h // 2
    assert (by_class[:, ~lower] == 0).all()
    torch.testing.assert_close(by_class[:, lower], from_file[:, lower])
    assert (_open(layout, size=None, normal_classes=[1, 2])[0]["normal"] == from_file).all()


def test_edge_measure_option_picks_the_metric(layout):
    from mtpsl.tasks.scoring import build_metrics, primary_keys

    ds = _open(layout, edge_measure="dilation")
    assert type(build_metrics(ds.tasks)["edges"]).__name__ == "DilationEdgeMetric"
    assert "edges/odsf_dilation" in primary_keys(ds.tasks)
    assert "edges/odsf" in primary_keys(_open(layout).tasks)
    with pytest.raises(ValueError, match="edge_measure"):
        _open(layout, edge_measure="canny")


def test_native_size_and_shrinking(layout):
    ds = _open(layout, size=None)
    assert ds[1]["image"].shape == (3, *SIZES["b"])
    small = _open(layout, size=[6, 6])[0]  # 10x14 shrinks to 4x6, then pads to 6x6
    assert small["image"].shape == (3, 6, 6) and (small["semantic"][4:] == -1).all()
    assert (small["semantic"][:4] >= 0).any()
    assert (small["normal"][:, 1:4].norm(dim=0) - 1).abs().max() < 1e-5


def test_edges_from_labels_are_one_pixel_boundaries():
    labels = np.zeros((5, 6), int)
    labels[:, 3:] = 2
    expected = np.zeros((5, 6), np.float32)
    expected[:, 2] = 1
    np.testing.assert_array_equal(edges_from_labels(labels), expected)


def test_task_subset_weights_and_bad_options(layout):
    ds = _open(layout, tasks=["edges", "parts"], size=[16, 16])
    assert ds.task_names == ("edges", "parts") and set(ds[0]) >= {"edges", "parts"}
    tasks = pascal_tasks(PASCAL_TASKS)
    assert [t.loss_weight for t in tasks.values()] == [1.0, 2.0, 10.0, 5.0, 50.0]
    assert tasks["normal"].loss_kind == "l1" and tasks["edges"].pos_weight == 0.95
    assert pascal_tasks(["edges"], {"edges": 1.0})["edges"].loss_weight == 1.0
    with pytest.raises(ValueError, match="allowed: semantic, parts"):
        _open(layout, tasks=["depth"])
    with pytest.raises(ValueError, match="size"):
        _open(layout, size=[16])
    with pytest.raises(ValueError, match="loss_weights"):
        _open(layout, loss_weights={"depth": 1.0})


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (
            lambda r: (
                (r / "sal_distill" / "a.png").unlink()
                or __import__("shutil").rmtree(r / "sal_distill")
            ),
            r"sal_distill \(for saliency\)",
        ),
        (lambda r: (r / "ImageSets/Context/train.txt").unlink(), r"train\.txt does not exist.*val"),
        (lambda r: (r / "JPEGImages" / "b.jpg").unlink(), r"b\.jpg .* does not exist"),
        (
            lambda r: _write(r / "semseg/pascal-context" / "a.png", b"garbage"),
            r"a\.png: not a readable image",
        ),
        (
            lambda r: Image.new("L", (3, 3)).save(r / "sal_distill" / "b.png"),
            r"b\.png: size \(3, 3\) differs",
        ),
        (
            lambda r: Image.new("L", (14, 10)).save(r / "normals_distill" / "a.png"),
            r"a\.png: expected image mode RGB",
        ),
        (
            lambda r: savemat(r / "pascal-context/trainval" / "c.mat", {"Other": np.zeros(2)}),
            r"c\.mat: no 'LabelMap'",
        ),
        (
            lambda r: _write(r / "human_parts" / "a.mat", b"not a mat file at all"),
            r"a\.mat: cannot read",
        ),
        (lambda r: (r / "ImageSets/Context/train.txt").write_text("a\na\n"), "listed twice"),
    ],
)
def test_broken_layouts_name_the_file(layout, breakage, message):
    breakage(layout)
    with pytest.raises(DataError, match=message):
        _open(layout)


def test_bad_values_fail_when_decoded(layout):
    sem = np.full(SIZES["c"], 30, np.uint8)
    Image.fromarray(sem).save(layout / "semseg/pascal-context" / "c.png")
    ds = _open(layout)
    with pytest.raises(DataError, match=r"c\.png: label values \[30\]"):
        ds[2]


def test_cli_check_and_missing_root(layout, tmp_path, capsys):
    assert main(["data", "check", "--root", str(layout), "--dataset", "pascal_context"]) == 0
    assert "n=3" in capsys.readouterr().out
    assert (
        main(["data", "check", "--root", str(tmp_path / "nope"), "--dataset", "pascal_context"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_training_augmentation_keeps_padding_invalid(layout):
    ds = _open(layout, size=[16, 16])
    tasks = ds.tasks
    transform = build_train_transform((1.0, 1.5), flip=True)
    item = ds[0]
    sample = {k: item[k][None] for k in ("image", *tasks)}
    flips = 0
    for seed in range(8):
        out = transform(sample, tasks, torch.Generator().manual_seed(seed))
        for name in ("saliency", "edges"):
            assert set(out[name].unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert set(out["parts"].unique().tolist()) <= set(range(-1, 7))
        x = out["normal"][0, 0][out["normal"][0].norm(dim=0) > 0]  # labelled x is -0.577
        flipped = bool(out["flip"].item())
        flips += flipped
        assert ((x > 0) if flipped else (x < 0)).all()
    assert 0 < flips < 8


# ----------------------------------------------------------------------------- splits


def _save_npy_mapping(path: Path, mapping: dict) -> None:
    np.save(path, np.array(mapping, dtype=object), allow_pickle=True)


def test_reference_split_formats(layout, tmp_path):
    ids = ["a", "b", "c"]
    mapping = {
        "semseg": ["a"],
        "human_parts": ["a", "b"],
        "normals": ["c"],
        "sal": [],
        "edge": ["b", "c"],
    }
    expected = np.array([[1, 1, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 1]], bool)
    (tmp_path / "s.json").write_text(json.dumps(mapping))
    _save_npy_mapping(tmp_path / "s.npy", mapping)
    for name in ("s.json", "s.npy"):
        split = Split.load(tmp_path / name, PASCAL_TASKS, ids)
        np.testing.assert_array_equal(split.labelled, expected)
    ours = {"semantic": ["c"], "parts": [], "normal": [], "saliency": ["a"], "edges": []}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    assert Split.load(tmp_path / "ours.json", PASCAL_TASKS, ids).counts()["saliency"] == 1


def test_reference_split_errors(tmp_path):
    ids = ["a", "b"]
    (tmp_path / "unknown.json").write_text(json.dumps({t: ["a", "zzz"] for t in PASCAL_TASKS}))
    with pytest.raises(DataError, match=r"unknown\.json.*\['zzz'\]"):
        Split.load(tmp_path / "unknown.json", PASCAL_TASKS, ids)
    (tmp_path / "few.json").write_text(json.dumps({"semantic": ["a"]}))
    with pytest.raises(DataError, match=r"few\.json has no image list for task\(s\) \['parts'"):
        Split.load(tmp_path / "few.json", PASCAL_TASKS, ids)
    with pytest.raises(DataError, match="must provide image ids"):
        Split.load(tmp_path / "few.json", PASCAL_TASKS)
    np.save(tmp_path / "plain.npy", np.zeros((2, 5)))
    with pytest.raises(DataError, match=r"plain\.npy is not a pickled"):
        Split.load(tmp_path / "plain.npy", PASCAL_TASKS, ids)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_npy_is_read_with_a_restricted_unpickler(tmp_path, capsys):
    payload = np.empty((), dtype=object)
    payload[()] = {"semantic": [_Evil()]}
    np.save(tmp_path / "evil.npy", payload, allow_pickle=True)
    with pytest.raises(DataError, match=r"evil\.npy .*refusing to unpickle builtins\.print"):
        Split.load(tmp_path / "evil.npy", PASCAL_TASKS, ["a"])
    assert "never run" not in capsys.readouterr().out
    raw = tmp_path / "raw.npy"  # a pickle stream that names os.system directly
    header = tmp_path / "hdr.npy"
    np.save(header, np.empty((), dtype=object), allow_pickle=True)
    blob = header.read_bytes()
    start = blob.index(b"\n") + 1
    raw.write_bytes(blob[:start] + pickle.dumps(__import__("os").system))
    with pytest.raises(DataError, match="refusing to unpickle"):
        Split.load(raw, PASCAL_TASKS, ["a"])


# ----------------------------------------------------------------------------- synthetic


def test_existing_synthetic_families_are_unchanged():
    """The committed demo results depend on these renders: integer labels of both families
    must stay bit-identical (digest recorded before the PASCAL family was added)."""
    digest = hashlib.sha256()
    for seed in range(3):
        for render in (render_indoor, render_street):
            out = render(seed, 24, 40)
            for key in ("semantic", "instance", "edge"):
                digest.update(np.ascontiguousarray(out[key]).tobytes())
    assert digest.hexdigest() == EXPECTED_DIGEST


EXPECTED_DIGEST = "7b50b4936fa44d26c1b84920346834eb554b8b88f32f1148116b46981f814191"


def test_synthetic_pascal_scene_labels():
    seen_people = False
    for seed in range(4):
        out = render_pascal(seed, 48, 64)
        h, w = out["semantic"].shape
        assert 38 <= h <= 48 and 51 <= w <= 64
        people = out["people"].any(0)
        assert ((out["parts"] > 0) == people).all()  # parts exactly on people
        assert (out["semantic"][people & (out["semantic"] >= 0)] == 15).all()
        np.testing.assert_array_equal(out["saliency"], out["label_map"] > 1)
        seen_people |= bool(people.any())
        again = render_pascal(seed, 48, 64)
        np.testing.assert_array_equal(again["image"], out["image"])
    assert seen_people


# ----------------------------------------------------------------------------- end to end


TINY = [
    *TINY_TRAIN,
    "dataset.options.size=[32,32]",
]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "pascal"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(root),
                "--layout",
                "pascal_context",
                "--n-train",
                "6",
                "--n-val",
                "2",
                "--height",
                "28",
                "--width",
                "32",
            ]
        )
        == 0
    )
    return root


@pytest.mark.slow  # six runs; the reference-split test below trains on the layout from the CLI
def test_cli_compare_sl_ssl_xtc_both_regimes_and_eval(synth_root, tmp_path, capsys):
    out = tmp_path / "grid"
    code = main(
        [
            "compare",
            "--config",
            "synthetic_table3",
            "--out",
            str(out),
            f"dataset.root={synth_root}",
            "compare.extra_cells=[]",
            *TINY,
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    for name in ("sl", "ssl", "xtc", "edges/odsf", "saliency/miou"):
        assert name in table
    finals = sorted(out.rglob("final_metrics.json"))
    assert len(finals) == 6
    for path in finals:
        metrics = json.loads(path.read_text())["metrics"]
        for key in ("semantic/miou", "parts/miou", "normal/mean", "saliency/maxf", "edges/odsf"):
            assert np.isfinite(metrics[key]), (path, key)
    run = finals[0].parent
    assert main(["eval", "--json", "--run", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated["edges/odsf"] == pytest.approx(
        json.loads(finals[0].read_text())["metrics"]["edges/odsf"]
    )


def test_cli_train_with_a_reference_split_file(synth_root, tmp_path):
    ids = (synth_root / "ImageSets/Context/train.txt").read_text().split()
    mapping = {
        "semseg": ids[:2],
        "human_parts": ids[2:3],
        "normals": ids[3:4],
        "sal": ids[4:5],
        "edge": ids[5:],
    }
    split_file = tmp_path / "pascal_split.npy"
    _save_npy_mapping(split_file, mapping)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                "synthetic_table3",
                "--run-dir",
                str(run),
                f"dataset.root={synth_root}",
                f"labels.file={split_file}",
                "method.name=sl",
                *TINY,
            ]
        )
        == 0
    )
    saved = Split.load(run / "split.json", PASCAL_TASKS)
    assert saved.counts() == {"semantic": 2, "parts": 1, "normal": 1, "saliency": 1, "edges": 1}


def test_presets_build_on_the_layout(layout):
    from mtpsl.core.config import load_config
    from mtpsl.engine.build import build_experiment

    for preset in ("pascal_context_onelabel", "pascal_context_random", "table3_pascal"):
        overrides = [f"dataset.root={layout}", "dataset.options.size=[16,16]", "model.width=0.0625"]
        exp = build_experiment(load_config(preset, overrides))
        assert tuple(exp.tasks) == PASCAL_TASKS
        assert exp.tasks["edges"].loss_weight == 50.0 and len(exp.train_set) == 3
        batch = exp.train_set[0]["views"][0]
        assert batch.image.shape == (3, 16, 16)
