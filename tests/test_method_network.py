"""``method.network`` (a method's own network, paired in a comparison like any method) and
``model.backbone.normalize`` (ImageNet statistics for ImageNet weights)."""

from __future__ import annotations

import pytest
import torch

from mtpsl.analysis.grid import cell_config_for
from mtpsl.core.config import load_config, trained_model
from mtpsl.core.errors import ConfigError
from mtpsl.core.names import preflight
from mtpsl.core.signature import context_of, setup_from_config, signature
from mtpsl.engine.build import check_names
from mtpsl.models.encoders import EncoderSpec
from mtpsl.models.encoders.base import IMAGENET_MEAN, IMAGENET_STD, build_encoder


def test_normalize_imagenet_equals_the_plain_encoder_on_hand_normalised_input():
    torch.manual_seed(0)
    plain = build_encoder(EncoderSpec(depth=18, output_stride=32)).eval()
    normed = build_encoder(EncoderSpec(depth=18, output_stride=32, normalize="imagenet")).eval()
    assert normed.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 48)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want, got = plain((x - mean) / std), normed(x)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_normalize_leaves_channels_beyond_rgb_alone():
    normed = build_encoder(EncoderSpec(depth=18, output_stride=32, normalize="imagenet"), 5).eval()
    seen = {}
    normed.stem.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x = torch.rand(1, 5, 32, 32)
    normed(x)
    torch.testing.assert_close(seen["x"][:, 3:], x[:, 3:], rtol=0, atol=0)
    assert not torch.equal(seen["x"][:, :3], x[:, :3])


def test_network_is_the_model_a_method_trains_and_its_key_names_it(tiny_root):
    config = load_config(None, [f"dataset.root={tiny_root}", "method.network=dense"])
    assert trained_model(config) == ("dense", "method.network")
    assert trained_model(load_config(None, [])) == ("segnet", "model.name")
    bad = load_config(None, [f"dataset.root={tiny_root}", "method.network=nosuch"])
    for check in (preflight, check_names):
        with pytest.raises(ConfigError, match=r"^method.network: unknown model 'nosuch'"):
            check(bad)


def test_unset_keys_keep_the_signatures_runs_had():
    setup = setup_from_config(load_config(None, []).model_dump())
    assert "network" not in setup["method"] and "normalize" not in setup["model"]["backbone"]
    changed = setup_from_config(load_config(None, ["model.backbone.normalize=imagenet"])
                                .model_dump())
    assert signature(changed) != signature(setup)


def test_a_variant_with_its_own_network_shares_the_grid_context():
    config = load_config("synthetic_partial_pascal_onelabel", [])
    stl = cell_config_for(config, "onelabel", "stl", 0)
    diffusion = cell_config_for(config, "onelabel", "diffusion_mtl", 0)
    assert trained_model(diffusion) == ("diffusion_mtl", "method.network")
    assert trained_model(stl) == ("segnet", "model.name")
    assert (context_of(setup_from_config(diffusion.model_dump()))
            == context_of(setup_from_config(stl.model_dump())))
