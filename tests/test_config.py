"""Config validation: every mistake names the key and what is allowed."""

from __future__ import annotations

import pytest

from mtpsl.core.config import load_config, preset_names
from mtpsl.core.errors import ConfigError
from mtpsl.engine.build import build_experiment, check_names


def test_defaults_and_overrides_parse_yaml_values():
    config = load_config(None, ["train.epochs=3", "dataset.augment.scales=[1.0, 2.0]",
                                "labels.ratios=[9, 1]", "method.options={}"])
    assert config.train.epochs == 3
    assert config.dataset.augment.scales == [1.0, 2.0]
    assert config.labels.ratios == [9.0, 1.0]


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.epoch=3"])
    message = str(err.value)
    assert "train.epoch: unknown key" in message and "epochs" in message


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"train\.device.*auto, cpu"):
        load_config(None, ["train.device=tpu"])


def test_unknown_regime_lists_allowed():
    with pytest.raises(ConfigError, match=r"labels.regime: unknown label regime 'half'; "
                       r"known: .*onelabel"):
        check_names(load_config(None, ["labels.regime=half"]))


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match=r"key\.subkey=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no_such_preset")


@pytest.mark.parametrize("name", preset_names())
def test_presets_validate(name):
    config = load_config(name)
    assert config.train.epochs > 0


def test_paper_presets_follow_the_reference_schedule():
    nyu = load_config("nyuv2_onelabel")
    assert (nyu.train.batch_size, nyu.train.epochs, nyu.optim.lr) == (2, 200, 1e-4)
    assert (nyu.optim.step_size, nyu.optim.gamma) == (100, 0.5)
    city = load_config("cityscapes_onelabel")
    assert city.train.batch_size == 8 and city.dataset.augment.flip


def test_registry_names_fail_with_config_key(layout_factory):
    root = layout_factory()
    for key, value, known in [("method.name", "magic", "sl"), ("model.name", "unet", "segnet"),
                              ("dataset.name", "kitti", "nyuv2"),
                              ("method.weighting", "fancy", "uniform")]:
        config = load_config(None, [f"dataset.root={root}", f"{key}={value}"])
        with pytest.raises(ConfigError, match=rf"{key}: unknown .*{value}.*{known}"):
            build_experiment(config)


def test_method_options_are_validated(layout_factory):
    config = load_config(None, [f"dataset.root={layout_factory()}", "method.options={lr: 1}"])
    with pytest.raises(ConfigError, match=r"method.options.lr"):
        build_experiment(config)


def test_bad_task_subset_is_a_config_error(layout_factory):
    config = load_config(None, [f"dataset.root={layout_factory()}", "dataset.tasks=[edges]"])
    with pytest.raises(ConfigError, match="edges"):
        build_experiment(config)
