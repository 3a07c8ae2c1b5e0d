"""``compare.weightings``: the grid crosses every method but the baseline with each loss
weighting, one ``method+weighting`` cell each, run end to end at a tiny size."""

from __future__ import annotations

import json

from mtpsl.cli import main
from mtpsl.config import load_config

from conftest import make_layout

TINY = ["model.width=0.0625", "train.epochs=1", "train.batch_size=2",
        "train.max_steps_per_epoch=1", "train.progress=false", "train.eval_every=1",
        "compare.seeds=[0]"]


def test_the_sweep_runs_every_method_with_every_weighting(tmp_path):
    root = make_layout(tmp_path / "data", n=4, h=64, w=96)
    out = tmp_path / "grid"
    code = main(["compare", "--config", "synthetic_weightings", "--out", str(out),
                 f"dataset.root={root}", *TINY, "compare.weightings=[uniform, pcgrad]"])
    assert code == 0
    cells = sorted(p.parent.name for p in out.glob("onelabel/*/seed0"))
    assert cells == ["sl+pcgrad", "sl+uniform", "stl", "xtc+pcgrad", "xtc+uniform"]
    for cell in cells:
        config = load_config(str(out / "onelabel" / cell / "seed0" / "config.yaml"))
        method, _, weighting = cell.partition("+")
        assert config.method.name == method and config.label == cell
        assert config.method.weighting == (weighting or "uniform")
        final = json.loads((out / "onelabel" / cell / "seed0" / "final_metrics.json").read_text())
        assert final["metrics"]
    assert "xtc+pcgrad" in (out / "results.md").read_text()


def test_an_unknown_weighting_names_the_key(tmp_path, capsys):
    code = main(["compare", "--config", "synthetic_weightings", "--out", str(tmp_path / "g"),
                 "compare.weightings=[pcgard]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "compare.weightings: unknown weighting 'pcgard'" in err and "pcgrad" in err
