"""RLW (random loss weighting), added as one file (``mtpsl/weighting/rlw.py``): its weights
against an independent draw, the partial-label case, its saved stream and a CLI run."""

from __future__ import annotations

import json

import pytest
import torch

from mtpsl.cli import main
from mtpsl.weighting import GradientContext, build_weighting

from conftest import TINY

NAMES = ("a", "b", "c")


def _toy():
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(5))
    targets = torch.randn(3, 5)
    losses = {n: ((shared - targets[k]) ** 2).sum() for k, n in enumerate(NAMES)}
    return shared, targets, losses


def _expected_weights(seed: int, steps: int, present: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z = torch.randn(3, generator=gen, dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64)
    w[present] = torch.exp(z[present]) / torch.exp(z[present]).sum()
    return w


@pytest.mark.parametrize("present", [[True, True, True], [True, False, True]])
def test_gradient_is_the_softmax_weighted_sum_of_the_present_tasks(present):
    present = torch.tensor(present)
    rlw = build_weighting("rlw", NAMES, {"seed": 7})
    for step in range(1, 4):  # the stream advances one draw of T values per step
        shared, targets, losses = _toy()
        rlw.backward(losses, torch.zeros(()), GradientContext(present, [shared]))
        w = _expected_weights(7, step, present)
        by_hand = sum(w[k] * 2 * (shared.detach() - targets[k]) for k in range(3))
        torch.testing.assert_close(shared.grad, by_hand.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rlw.last_weights, w.float())
    assert rlw.last_weights[~present].eq(0).all()
    assert rlw.last_weights.sum() == pytest.approx(1.0)


def test_the_stream_does_not_depend_on_presence_and_survives_a_state_dict():
    full, partial = (build_weighting("rlw", NAMES) for _ in range(2))
    for _ in range(3):
        for weighting, mask in ((full, [True] * 3), (partial, [False, True, True])):
            shared, _, losses = _toy()
            weighting.backward(losses, torch.zeros(()),
                               GradientContext(torch.tensor(mask), [shared]))
    saved = partial.state_dict()
    resumed = build_weighting("rlw", NAMES)
    resumed.load_state_dict(saved)
    nxt = [w.draw(torch.tensor([True] * 3)) for w in (full, partial, resumed)]
    torch.testing.assert_close(nxt[0], nxt[1])
    torch.testing.assert_close(nxt[0], nxt[2])


def test_trains_from_the_cli_and_refuses_accumulation(tiny_root, tmp_path, capsys):
    args = [f"dataset.root={tiny_root}", "method.weighting=rlw", *TINY]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *args]) == 0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["metrics"]
    assert main(["train", "--run-dir", str(tmp_path / "acc"), *args, "train.accumulate=2"]) == 2
    assert "train.accumulate" in capsys.readouterr().err
