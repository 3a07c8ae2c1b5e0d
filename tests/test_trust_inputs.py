"""Inputs an adversarial user gives (issue 28, classes 2, 3 and 8's paths and opset): bounds on
every config key, alias bombs anywhere in a config, files that are not config files, synthetic
sizes, label values ``data check`` must read, paths that leave their folder. Each test names
the code it guards; each fails without it."""

from __future__ import annotations

import time
import types
import typing

import numpy as np
import pytest
from pydantic import BaseModel

from mtpsl.cli import main
from mtpsl.core.config import MAX_CONFIG_BYTES, MAX_YAML_VALUES, Config, load_config, parse_yaml
from mtpsl.core.errors import ConfigError
from mtpsl.data.synthetic import write_nyuv2_layout, write_pascal_layout

from conftest import TINY, make_layout


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def _numeric_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, shape) of every numeric key: shape ``one``, ``list`` or ``pair``."""
    found = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _numeric_keys(annotation, key + ".")
            continue
        shape = "one"
        args = [a for a in _union_args(annotation) if a is not type(None)]
        containers = [a for a in args if typing.get_origin(a) in (list, tuple)]
        if containers:
            container = containers[0]
            shape = "list" if typing.get_origin(container) is list else "pair"
            args = list(typing.get_args(container)[:1])
        if any(_is_number(a) for a in args):
            found.append((key, shape))
    return found


def _union_args(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_number(annotation) -> bool:
    if typing.get_origin(annotation) is typing.Literal:
        return all(type(a) is int for a in typing.get_args(annotation))
    return annotation in (int, float)


NUMERIC_KEYS = _numeric_keys()


# -- 2. every key has the bounds its use needs (guards the Field bounds and validators of
#       mtpsl.core.config and the argument checks of `mtpsl data synth` / `data check`) ------

def test_the_walk_finds_the_numeric_keys():
    keys = dict(NUMERIC_KEYS)
    assert {"train.eval_batch_size", "model.width", "labels.ratios", "optim.lr", "optim.betas",
            "seed", "compare.seeds", "dataset.augment.scales",
            "compare.launcher.mem_gb"} <= set(keys)
    assert len(keys) >= 33


@pytest.mark.parametrize(("key", "shape"), NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
@pytest.mark.parametrize("value", ["1000000000000000000000000000000", "1.0e30", "-1.0e30"])
def test_every_numeric_key_refuses_absurd_values_naming_itself(key, shape, value):
    """Guards the upper and lower bound of every numeric key of ``mtpsl.core.config``."""
    text = {"one": value, "list": f"[{value}]", "pair": f"[{value}, {value}]"}[shape]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={text}"])
    assert f"  {key}" in str(err.value)


@pytest.mark.parametrize(("override", "key"), [
    ("train.eval_batch_size=100000000000000000000", "train.eval_batch_size"),
    ("model.width=1.0e30", "model.width"),
    ("labels.ratios=[1.0e308, 1.0e308, 1.0e308]", "labels.ratios"),
    ("labels.ratios=[0, 0, 0]", "labels.ratios"),
    ("optim.lr=3.3e38", "optim.lr"),
    ("optim.betas=[1.0, 0.999]", "optim.betas"),
    ("dataset.augment.scales=[1.0, 100.0]", "dataset.augment.scales"),
    ("seed=-1", "seed"),
    ("train.accumulate=1000000000", "train.accumulate"),
    ("dataset.root=\"a\\0b\"", "dataset.root"),
])
def test_values_the_code_cannot_use_fail_before_anything_is_written(tmp_path, capsys,
                                                                   override, key):
    """Guards the bounds in ``mtpsl.core.config`` (each of these was an internal error or a
    run that could not learn). train.threads=10**6 is left to the in-process walk above:
    unguarded, it starts a million threads."""
    root = make_layout(tmp_path, n=2, h=32, w=32)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"dataset.root={root}", *TINY, override]) == 2
    assert f"  {key}: " in _error(capsys)
    assert not run.exists()


def test_config_show_still_renders_every_key_with_its_bounds(capsys):
    """Guards that bounds live where ``mtpsl config show`` reads them (Field metadata or the
    key's docstring)."""
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    for line in ["width: 1.0", "≤ 8.0", "lr: 0.0001", "≤ 10.0", "eval_batch_size: 8",
                 "≤ 65536", "each in [1, 8]", "each in [0, 1e6]", "1..4096"]:
        assert line in out, line


def test_config_files_that_are_devices_or_huge_are_refused(tmp_path, capsys):
    """Guards ``config._read_text``: a device (``--config /dev/zero`` read forever) or a file
    over MAX_CONFIG_BYTES is refused before it is read. /dev/null stands for the device here:
    unguarded, /dev/zero never returns."""
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    for path, expect in [("/dev/null", "not a regular file"), (huge, "larger than 1 MiB")]:
        t0 = time.perf_counter()
        assert main(["train", "--config", str(path)]) == 2
        assert expect in _error(capsys) and time.perf_counter() - t0 < 5


@pytest.mark.parametrize(("flag", "value"), [("--height", "0"), ("--height", "-32"),
                                             ("--width", "0"), ("--n-train", "-5"),
                                             ("--n-val", "0"), ("--seed", "-1"),
                                             ("--height", "100000")])
def test_data_synth_refuses_sizes_and_counts_below_one(tmp_path, capsys, flag, value):
    """Guards ``data._count`` (the arguments of ``mtpsl data synth``): --height 0 rendered the
    default 288 rows, -32 empty images, --n-train -5 exited 0."""
    out = tmp_path / "d"
    args = {"--n-train": "1", "--n-val": "1", "--height": "8", "--width": "8", flag: value}
    with pytest.raises(SystemExit) as exit_:
        main(["data", "synth", "--out", str(out), *(x for kv in args.items() for x in kv)])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
    assert not out.exists()


def test_data_synth_pair_names_the_layouts_it_renders(tmp_path, capsys):
    """Guards ``cmd_synth``'s --pair check: pascal_context was a KeyError (internal error)."""
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--layout", "pascal_context",
                 "--pair", "--n-train", "1", "--n-val", "1", "--height", "8", "--width", "8"]) == 2
    assert "--pair renders the nyuv2 and cityscapes layouts" in _error(capsys)


def test_the_synthetic_writers_refuse_non_positive_sizes(tmp_path):
    """Guards ``synthetic._check_sizes`` (the Python API behind ``data synth``)."""
    for kwargs in [dict(height=-32), dict(width=0), dict(n_train=-5), dict(n_val=0)]:
        full = dict(n_train=1, n_val=1, height=8, width=8) | kwargs
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an integer >= 1"):
            write_nyuv2_layout(tmp_path / "d", progress=False, **full)
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            write_pascal_layout(tmp_path / "p", progress=False, **full)
    assert not (tmp_path / "d").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize(("folder", "value", "expect"), [
    ("label", 13.0, "outside the classes of task 'semantic'"),
    ("depth", -1.0, "depth must be >= 0"),
    ("depth", np.inf, "NaN or inf"),
])
def test_data_check_reads_every_label_value(tmp_path, capsys, folder, value, expect):
    """Guards ``cmd_check``'s decoding pass: it read only the headers, so class ids beyond the
    class count and negative or infinite depth passed the check and failed mid-training."""
    root = make_layout(tmp_path, n=3, h=8, w=8)
    path = root / "train" / folder / "2.npy"
    arr = np.load(path)
    arr.flat[5] = value
    np.save(path, arr)
    assert main(["data", "check", "--root", str(root)]) == 2
    err = _error(capsys)
    assert str(path) in err and expect in err
    assert main(["data", "check", "--root", str(root), "--headers-only"]) == 0
    assert "values: not checked" in capsys.readouterr().out


def test_data_check_refuses_empty_images(tmp_path, capsys):
    """Guards ``LayoutDataset._scan``'s empty-image check (what --height -32 rendered)."""
    root = make_layout(tmp_path, n=2, h=8, w=8)
    for split in ("train", "val"):
        for folder, shape in [("image", (0, 0, 3)), ("label", (0, 0)), ("depth", (0, 0, 1)),
                              ("normal", (0, 0, 3))]:
            for i in range(2):
                np.save(root / split / folder / f"{i}.npy", np.zeros(shape, np.float32))
    assert main(["data", "check", "--root", str(root)]) == 2
    assert "empty image" in _error(capsys)


# -- 3. alias bombs anywhere (guards config.parse_yaml's _expanded_size) --------------------

def _bomb(levels: int, flow: bool, indent: int = 0) -> str:
    """A mapping of ``levels`` anchors, each aliasing the previous one ten times."""
    names = [f"a0: &a0 [{', '.join(['1'] * 10)}]"]
    names += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    if flow:
        return "{" + ", ".join(names) + "}"
    return "\n".join(" " * indent + n for n in names)


@pytest.mark.parametrize("where", ["method:\n  weighting_options:\n    opts:\n",
                                   "compare:\n  variants:\n    x:\n      method: sl\n"
                                   "      options:\n        opts:\n",
                                   "dataset:\n  options:\n    extra_tasks:\n"])
def test_an_alias_bomb_nested_in_a_config_file_is_refused(tmp_path, where):
    """5 levels expand to 10**5 values: loaded quietly before, then walked by every later
    step (6 levels took 12 s and 665 MB)."""
    path = tmp_path / "bomb.yaml"
    indent = len(where.splitlines()[-1]) - len(where.splitlines()[-1].lstrip()) + 2
    path.write_text(where + _bomb(5, flow=False, indent=indent) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert f"config {path} expands to more than {MAX_YAML_VALUES:,} values" in str(err.value)
    assert time.perf_counter() - t0 < 5


def test_an_alias_bomb_in_an_override_value_is_refused():
    """The same bound on ``key=value`` overrides (one loader for files and values)."""
    with pytest.raises(ConfigError, match=r"override 'method\.weighting_options=.*alias bomb"):
        load_config(None, [f"method.weighting_options={_bomb(5, flow=True)}"])


def test_an_alias_bomb_is_a_one_line_cli_error(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("method:\n  weighting_options:\n" + _bomb(9, flow=False, indent=4) + "\n")
    assert main(["config", "show", str(path)]) == 2
    assert "alias bomb" in _error(capsys)


def test_a_huge_bomb_and_an_endless_alias_are_refused_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="alias bomb"):
        parse_yaml(_bomb(12, flow=True), "value")  # 10**12 values
    with pytest.raises(ConfigError, match="endless"):
        parse_yaml("&a [*a]", "value")
    assert time.perf_counter() - t0 < 2


def test_an_ordinary_alias_still_loads():
    assert parse_yaml(_bomb(3, flow=True), "value")["a3"][0][0][0] == [1] * 10


# -- 8. paths stay in their folder; the opset is one the exporter writes ---------------------

def test_a_pascal_image_id_cannot_leave_the_dataset_root(tmp_path, capsys):
    """Guards ``pascal.read_ids``: an id ``../../img/x`` read ROOT/JPEGImages/../../img/x.jpg."""
    root = write_pascal_layout(tmp_path / "pascal", n_train=1, n_val=1, height=16, width=16,
                               progress=False)
    outside = tmp_path / "img"
    outside.mkdir()
    (outside / "x.jpg").write_bytes((next((root / "JPEGImages").iterdir())).read_bytes())
    listing = root / "ImageSets" / "Context" / "train.txt"
    listing.write_text("../../img/x\n")
    assert main(["data", "check", "--root", str(root), "--dataset", "pascal_context"]) == 2
    err = _error(capsys)
    assert f"split file {listing}" in err and "'../../img/x' is a path" in err


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", ".", "a/../../x", "..\\..\\x"])
def test_a_run_name_cannot_leave_output_dir(tmp_path, capsys, name):
    """Guards ``Config._inside_output_dir``: ``name=../../x`` wrote the run outside
    output_dir (engine.run.new_run_dir joins them)."""
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    root = make_layout(tmp_path, n=2, h=32, w=32)
    out = tmp_path / "a" / "b" / "out"
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", f"output_dir={out}", f"name={name}", f"dataset.root={root}",
                 *TINY, "train.device=cpu"]) == 2
    assert "  name: " in _error(capsys)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_run_name_may_hold_sub_folders():
    assert load_config(None, ["name=study/run-1"]).name == "study/run-1"


def test_export_refuses_an_opset_the_exporter_cannot_write(tmp_path, capsys):
    """Guards ``export.check_opset``: ``--opset 99`` wrote opset 18 without a word. Checked
    before the run is read (so the run need not exist here)."""
    onnx = pytest.importorskip("onnx")
    newest = onnx.defs.onnx_opset_version()
    assert main(["export", "--run", str(tmp_path / "none"), "--opset", "99"]) == 2
    assert f"--opset 99 is newer than the installed onnx {onnx.__version__} supports: at " \
           f"most {newest}" in _error(capsys)


@pytest.mark.parametrize("key", ["train_split", "eval_split"])
@pytest.mark.parametrize("split", ["../../elsewhere/nyuv2/train", "ABSOLUTE", ".", "a/../../x"])
def test_a_split_cannot_leave_the_dataset_root(tmp_path, capsys, key, split):
    """Guards ``data.base.check_split_name`` in ``LayoutDataset``: ``dataset.train_split=
    ../../x`` trained on ROOT/../../x, a layout outside the dataset root (here a valid one,
    so only the check can stop it)."""
    root = make_layout(tmp_path / "data", n=2, h=32, w=32)
    outside = make_layout(tmp_path / "elsewhere", n=2, h=32, w=32)
    split = str(outside / "train") if split == "ABSOLUTE" else split
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", "--run-dir", str(tmp_path / "run"), f"dataset.root={root}",
                 f"dataset.{key}={split}", *TINY, "train.device=cpu"]) == 2
    err = _error(capsys)
    assert f"{split!r} does not name a split inside the dataset root {root}" in err
    assert "dataset.train_split / dataset.eval_split" in err
    assert sorted(tmp_path.rglob("*")) == before  # no run folder left behind


def test_a_pascal_split_cannot_leave_the_dataset_root(tmp_path):
    """Guards ``check_split_name`` in ``pascal.read_ids``: ImageSets/Context/{split}.txt."""
    from mtpsl.data.pascal import read_ids

    root = write_pascal_layout(tmp_path / "pascal", n_train=1, n_val=1, height=16, width=16,
                               progress=False)
    (tmp_path / "x.txt").write_text("2008_000002\n")
    with pytest.raises(ConfigError, match="does not name a split inside"):
        read_ids(root, "../../../x")
    assert read_ids(root, "train")


def test_a_split_may_be_a_sub_folder():
    from mtpsl.data.base import check_split_name

    assert check_split_name("fold1/train", "ROOT") == "fold1/train"
    for bad in ("", "  ", "a\0b", "C:x", "\\server\\x"):
        with pytest.raises(ConfigError, match="does not name a split"):
            check_split_name(bad, "ROOT")
