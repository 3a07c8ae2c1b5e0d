"""GLS (geometric loss strategy), one file (``mtpsl/weighting/gls.py``): its value and
gradient against the closed form, and the partial-label case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtpsl.weighting import GradientContext, build_weighting

NAMES = ("a", "b", "c")


def _run(present):
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(4))
    targets = torch.randn(3, 4)
    losses = {n: ((shared - targets[k]) ** 2).sum() for k, n in enumerate(NAMES)}
    values = {n: float(v) for n, v in losses.items()}
    for k, n in enumerate(NAMES):
        if not present[k]:
            losses[n] = losses[n] * 0.0  # absent: an exact 0
    total = build_weighting("gls", NAMES).backward(
        losses, torch.zeros(()), GradientContext(torch.tensor(present), [shared]))
    return total, shared, targets, values


@pytest.mark.parametrize("present", [[True, True, True], [True, False, True]])
def test_value_and_gradient_are_the_geometric_means(present):
    total, shared, targets, values = _run(present)
    kept = [k for k in range(3) if present[k]]
    gls = math.prod(values[NAMES[k]] for k in kept) ** (1 / len(kept))
    assert float(total) == pytest.approx(gls, rel=1e-6)
    x = shared.detach().numpy()
    expected = sum(gls / (len(kept) * values[NAMES[k]]) * 2 * (x - targets[k].numpy())
                   for k in kept)
    np.testing.assert_allclose(shared.grad.numpy(), expected, rtol=1e-5)


def test_nothing_present_gives_no_gradient():
    total, shared, _, _ = _run([False, False, False])
    assert float(total) == 0.0 and shared.grad is None
