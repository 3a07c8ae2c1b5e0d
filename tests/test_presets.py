"""Every shipped preset, and every cell of its comparison grid, is a valid run config."""

from __future__ import annotations

import pytest

from mtpsl.analysis.compare import cell_config_for, grid_cells
from mtpsl.core.config import load_config, preset_names
from mtpsl.core.errors import ConfigError
from mtpsl.data.pascal import PASCAL_TASKS, pascal_tasks
from mtpsl.data.splits import REGIMES
from mtpsl.methods import METHODS, build_method
from mtpsl.tasks import build_task

TASKS = {"nyuv2": {"semantic": build_task("segmentation", "semantic", num_classes=13),
                   "depth": build_task("depth", "depth"), "normal": build_task("normal", "normal")},
         "cityscapes": {"semantic": build_task("segmentation", "semantic", num_classes=7),
                        "depth": build_task("depth", "depth")},
         "pascal_context": pascal_tasks(PASCAL_TASKS)}
TASKS["cross_domain"] = TASKS["cityscapes"]  # the SemiMTL presets pair two Cityscapes sources


@pytest.mark.parametrize("name", preset_names())
def test_every_grid_cell_builds(name):
    config = load_config(name)
    tasks = {k: t for k, t in TASKS[config.dataset.name].items()
             if config.dataset.tasks is None or k in config.dataset.tasks}
    for regime, method in grid_cells(config):
        cell = cell_config_for(config, regime, method, seed=0)
        assert cell.labels.regime in REGIMES
        assert cell.method.name in METHODS
        build_method(cell.method.name, tasks, cell.method.options)  # validates options


def test_variants_ratios_and_extra_cells():
    config = load_config("table4_cityscapes_ratio", ["compare.extra_cells=[sl@full]"])
    cells = grid_cells(config)
    assert ("ratio:9:1", "xtc") in cells and cells[-1] == ("full", "sl")
    cell = cell_config_for(config, "ratio:1:9", "xtc", seed=2)
    assert (cell.labels.regime, cell.labels.ratios, cell.seed) == ("ratio", [1.0, 9.0], 2)
    assert cell.method.options == {"con_weight": 1.0, "film_lr": 1e-5}
    plain = cell_config_for(load_config("table6_ablation_nyuv2"), "onelabel", "xtc_nocond", 0)
    assert plain.method.name == "xtc" and plain.method.options["conditioned"] is False


def test_bad_cells_name_the_key():
    config = load_config("synthetic_demo", ["compare.extra_cells=[slfull]"])
    with pytest.raises(ConfigError, match="method@regime"):
        grid_cells(config)
    with pytest.raises(ConfigError, match="ratio:9:1"):
        cell_config_for(config, "ratio:a:b", "sl", 0)
