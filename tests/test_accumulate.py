"""``train.accumulate``: k micro-batches per optimiser step equal one step on a k times larger
batch (tested on a normalisation-free model, where that holds exactly up to rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtpsl.cli import main
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.models import MODELS, FeatureInfo, ModelOutput, MultiTaskModel

from conftest import make_layout


class NoNorm(MultiTaskModel):
    """Conv-ReLU trunk and 1x1 heads: nothing depends on which images share a batch."""

    def __init__(self, heads, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        self.body = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.heads = nn.ModuleDict({t: nn.Conv2d(4, s.channels, 1) for t, s in heads.items()})
        self.activations = {t: s.activation for t, s in heads.items()}

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.body.parameters())

    @property
    def encoder_info(self) -> FeatureInfo:
        return FeatureInfo(4, 1, lambda h, w: (h, w))

    def forward(self, x):
        h = F.relu(self.body(x))
        preds = {t: self.activations[t](head(h)) for t, head in self.heads.items()}
        return ModelOutput(preds, {"encoder": h})


MODELS.register("test_no_norm")(NoNorm)
COMMON = ["model.name=test_no_norm", "optim.optimizer=sgd", "optim.momentum=0", "optim.lr=0.5",
          "train.epochs=1", "train.progress=false", "dataset.augment.scales=[1.0]",
          "dataset.augment.flip=false", "labels.regime=random", "train.amp=off"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("data"), n=10, h=64, w=96)


def _weights(root, run, *extra) -> dict[str, torch.Tensor]:
    assert main(["train", "--run-dir", str(run), f"dataset.root={root}", *COMMON, *extra]) == 0
    return load_checkpoint(run / "checkpoint.pt")["model"]


@pytest.mark.parametrize("method", ["sl", "stl", "ssl", "pseudo_label", "mean_teacher"])
def test_two_micro_batches_equal_one_batch_of_twice_the_size(root, tmp_path, method):
    """Methods whose losses are per-image means. Left out: xtc (its Gumbel noise is drawn per
    pair across the batch, so a batch of 4 and two of 2 give an image different noise) and
    direct/perceptual maps (BatchNorm in the mapping SegNets)."""
    extra = [f"method.name={method}"]
    big = _weights(root, tmp_path / "big", *extra, "train.batch_size=4",
                   "train.max_steps_per_epoch=1")
    micro = _weights(root, tmp_path / "micro", *extra, "train.batch_size=2",
                     "train.accumulate=2", "train.max_steps_per_epoch=2")
    single = _weights(root, tmp_path / "single", *extra, "train.batch_size=2",
                      "train.max_steps_per_epoch=1")
    for key in big:
        torch.testing.assert_close(micro[key], big[key], rtol=1e-5, atol=1e-6)
    # ...and the test can tell: half the batch is a different step
    assert any(not torch.allclose(single[k], big[k], rtol=1e-4, atol=1e-5) for k in big)


def test_accumulation_refuses_weightings_that_are_not_linear(root, tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "r"), f"dataset.root={root}", *COMMON,
                 "train.accumulate=2", "method.weighting=pcgrad"])
    assert code == 2
    assert "train.accumulate" in capsys.readouterr().err
