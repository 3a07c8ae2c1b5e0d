"""A run extended by ``--resume train.epochs=N`` equals one trained N epochs from the start.

The shorter run evaluates at its last epoch where the longer one does not; the evaluation's
data loader must not draw from the global random stream that training draws from (JTR's
Gumbel samples do), or the two runs part after that evaluation."""

from __future__ import annotations

import pytest
import torch

from mtpsl.cli import main

from conftest import TINY_TRAIN, train_cli

ARGS = [*TINY_TRAIN, "method.name=jtr", "method.options.ae_width=0.0625", "train.eval_every=5",
        "train.checkpoint_every=1", "labels.regime=onelabel", "train.device=cpu"]


def _weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow  # three tiny runs (about 5 s); guards eval_loader's own generator (build.py)
def test_extending_a_run_by_resume_equals_training_it_at_that_length(tmp_path, tiny_root):
    straight = train_cli(tmp_path / "straight", tiny_root, *ARGS, "train.epochs=2")
    extended = train_cli(tmp_path / "extended", tiny_root, *ARGS, "train.epochs=1")
    assert main(["train", "--resume", str(extended), "train.epochs=2"]) == 0
    ours, theirs = _weights(extended), _weights(straight)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
