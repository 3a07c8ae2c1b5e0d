"""``compare.weightings``: the grid crosses every method but the baseline with each loss
weighting, one ``method+weighting`` cell each, run end to end at a tiny size."""

from __future__ import annotations

import json

import pytest
import torch

from mtpsl.analysis.compare import sweep_weightings
from mtpsl.cli import main
from mtpsl.core.config import load_config
from mtpsl.engine.build import build_experiment, train_loader
from mtpsl.models import shared_parameters
from mtpsl.weighting import WEIGHTINGS, GradientContext, build_weighting

from conftest import TINY, representation_of

GRID = [*TINY, "train.max_steps_per_epoch=1", "train.eval_every=1", "compare.seeds=[0]"]


@pytest.mark.slow  # ~50 runs; each strategy's step is checked below and compare's CLI elsewhere
def test_the_preset_runs_every_method_with_every_weighting(tmp_path, shared_layout):
    """The whole synthetic_weightings grid (every registered strategy with SL and XTC)."""
    root = shared_layout(n=4, h=64, w=96)
    out = tmp_path / "grid"
    code = main(["compare", "--config", "synthetic_weightings", "--out", str(out),
                 f"dataset.root={root}", *GRID])
    assert code == 0
    cells = sorted(p.parent.name for p in out.glob("onelabel/*/seed0"))
    assert cells == sorted(["stl", *(f"{m}+{w}" for m in ("sl", "xtc")
                                     for w in WEIGHTINGS.names())])
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


@pytest.mark.parametrize("bad, message", [
    (["method.weighting=mgda", "method.weighting_gradients=representation",
      "compare.weightings=[mgda, uniform]"],
     "compare cell sl+uniform: method.weighting_gradients: 'representation' needs"),
    (["compare.weightings=[]", "compare.variants.xtc.options={con_weight: 2.0, conweight: 1}"],
     "compare cell xtc: "),
], ids=["gradients", "variant-option"])
def test_a_bad_cell_stops_the_grid_before_any_training(tmp_path, capsys, shared_layout, bad,
                                                       message):
    root = shared_layout(n=4, h=64, w=96)
    out = tmp_path / "grid"
    code = main(["compare", "--config", "synthetic_weightings", "--out", str(out),
                 f"dataset.root={root}", *GRID, *bad])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(out.glob("*/*/seed0"))  # not one cell trained


@pytest.fixture(scope="module")
def batch_of(tiny_root):
    """A real training batch of the synthetic_weightings set-up (one label per image), and the
    experiment for each method, built at a tiny size once."""
    built = {}
    for method in ("sl", "xtc"):
        config = load_config("synthetic_weightings", [f"dataset.root={tiny_root}", *GRID,
                                                      f"method.name={method}"])
        exp = build_experiment(config)
        batch = next(iter(train_loader(exp, torch.device("cpu"))))
        built[method] = (config, exp, batch)
    return built


@pytest.mark.parametrize("method", ["sl", "xtc"])
@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_every_weighting_takes_a_training_step_of_the_preset(batch_of, method, weighting):
    """The preset's methods with every registered strategy (compare.weightings: [all]): one
    real batch with partial labels through the method, the strategy's backward pass and an
    optimiser step; the shared parameters move and nothing is non-finite. (The end-to-end
    sweep above runs two strategies through the CLI; this covers all without 50 runs.)"""
    config, exp, batch = batch_of[method]
    torch.manual_seed(0)
    strategy = build_weighting(weighting, list(exp.tasks))
    shared = shared_parameters(exp.model)
    before = [p.detach().clone() for p in shared]
    optimiser = torch.optim.SGD([*exp.model.parameters(), *exp.method.parameters(),
                                 *strategy.parameters()], lr=1e-3)
    optimiser.zero_grad()
    losses, out = exp.method.compute(exp.model, batch)
    extra = sum(losses.extra.values(), torch.zeros(()))
    context = GradientContext(batch.labelled.any(0), shared,
                              **representation_of(strategy, out.features["shared"]))
    total = strategy.backward(dict(losses.tasks), extra, context)
    assert torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in shared if p.grad is not None)
    optimiser.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, shared, strict=True))
    strategy.end_epoch({t: float(v.detach()) for t, v in losses.tasks.items()})
    assert sweep_weightings(config.compare.weightings) == WEIGHTINGS.names()


def test_the_pass_after_the_step_changes_no_statistics(batch_of):
    """FAMO's second look at the batch (TrainStep.losses_after_step) runs the method in
    training mode but leaves every BatchNorm statistic of the model and the method as it was."""
    from mtpsl.core.distributed import DistEnv
    from mtpsl.engine.step import TrainStep, build_optimisation

    _, exp, batch = batch_of["xtc"]
    exp.model.train()
    exp.method.train()

    def state() -> dict:
        return {**{f"model.{k}": v.clone() for k, v in exp.model.state_dict().items()},
                **{f"method.{k}": v.clone() for k, v in exp.method.state_dict().items()}}

    before = state()
    step = TrainStep(exp, build_optimisation(exp), torch.device("cpu"), DistEnv())
    losses, present = step.losses_after_step(batch)
    assert set(losses) == set(exp.tasks) and all(torch.isfinite(v) for v in losses.values())
    assert torch.equal(present, batch.labelled.any(0))
    after = state()
    assert any("running_mean" in k for k in before)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
