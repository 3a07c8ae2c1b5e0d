"""``docs/extending.md`` holds for every plugin kind: one new file in the folder its table names
is registered, listed by ``mtpsl list`` (a sub-command by ``mtpsl --help``), and run through
the shared contract tests of ``tests/test_registries.py``, which pass a correct entry and fail
a broken one (so those tests cannot pass whatever they are given).

The files go into a copy of the ``mtpsl`` package in a temporary folder, which subprocesses
import first (``PYTHONPATH``): the working tree is never written to, nothing can be left behind
in it, and this process's registries stay as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import mtpsl

TESTS = Path(__file__).resolve().parent
PACKAGE = Path(mtpsl.__file__).resolve().parent

HEADER = "from __future__ import annotations\n"

PLUGINS = {
    "tasks/probe_task.py": '''
        from collections.abc import Mapping
        from dataclasses import dataclass
        from typing import Any, ClassVar

        from torch import Tensor

        from mtpsl.metrics.base import METRICS
        from mtpsl.metrics.depth import DepthMetric
        from mtpsl.tasks.base import TASKS
        from mtpsl.tasks.depth import DepthTask


        @METRICS.register("probe_beside")
        class ScaledDepthMetric(DepthMetric):
            """Depth errors, registered beside the task that names it (a probe)."""


        @TASKS.register("probe_ok")
        @dataclass(frozen=True, kw_only=True)
        class ScaledDepth(DepthTask):
            """Depth in other units, a required option (a probe)."""

            unit: float
            metric: ClassVar[str] = "probe_beside"
            contract_options: ClassVar[Mapping[str, Any]] = {"unit": 0.5}


        @TASKS.register("probe_broken")
        @dataclass(frozen=True)
        class LeakyBlank(DepthTask):
            """Broken: a hidden label keeps its pixels valid (a probe)."""

            def blank_like(self, target: Tensor) -> Tensor:
                return target.clone()
        ''',
    "metrics/probe_metric.py": '''
        import torch

        from mtpsl.metrics.base import METRICS, Metric


        @METRICS.register("probe_ok")
        class AbsError(Metric):
            """Mean absolute depth error, no task type's default (a probe)."""

            higher_is_better = {"abs_err": False}
            contract_task = ("depth", {})

            def _new_state(self, device, float_dtype):
                return {"sum": torch.zeros((), dtype=float_dtype, device=device),
                        "count": torch.zeros((), dtype=torch.int64, device=device)}

            def update(self, pred, target):
                self._follow(pred, target)
                valid = target != 0
                error = (pred - target).abs() * valid
                self._state["sum"] += error.sum(dtype=self._state["sum"].dtype)
                self._state["count"] += valid.sum()

            def compute(self):
                state = self._host()
                return {"abs_err": float(state["sum"]) / max(int(state["count"]), 1)}


        @METRICS.register("probe_broken")
        class RunningMean(AbsError):
            """Broken: a running mean, which no sum over processes combines (a probe)."""

            def _new_state(self, device, float_dtype):
                return {"mean": torch.zeros((), dtype=float_dtype, device=device),
                        "count": torch.zeros((), dtype=torch.int64, device=device)}

            def update(self, pred, target):
                self._follow(pred, target)
                valid = target != 0
                n = valid.sum()
                batch = ((pred - target).abs() * valid).sum(dtype=self._state["mean"].dtype)
                total = self._state["count"] + n
                self._state["mean"] += (batch / n.clamp(min=1) - self._state["mean"]) * (
                    n / total.clamp(min=1))
                self._state["count"] += n

            def compute(self):
                return {"abs_err": float(self._host()["mean"])}
        ''',
    "models/encoders/probe_encoder.py": '''
        import math

        from torch import nn

        from mtpsl.models.encoders.base import ENCODERS, Encoder, EncoderSpec


        class TwoStages(Encoder):
            """Two stride-2 convolutions."""

            def __init__(self, width: int, floor: bool = False) -> None:
                super().__init__()
                self.a = nn.Conv2d(3, width, 3, 2, 1)
                self.b = nn.Conv2d(width, 2 * width, 3, 2, 1)
                self.channels, self.reductions, self.floor = (width, 2 * width), (2, 4), floor

            @classmethod
            def contract_spec(cls, name: str) -> EncoderSpec:
                return EncoderSpec(name=name, options={"width": 4})

            def forward(self, x):
                h = self.a(x)
                return [h, self.b(h)]

            def feature_size(self, height, width):
                if self.floor:
                    return height // 4, width // 4
                return math.ceil(height / 4), math.ceil(width / 4)


        @ENCODERS.register("probe_ok")
        def probe_ok(spec: EncoderSpec) -> TwoStages:
            """Two strided convolutions, options.width wide, a required option (a probe)."""
            return TwoStages(int(spec.options["width"]))


        @ENCODERS.register("probe_broken")
        def probe_broken(spec: EncoderSpec) -> TwoStages:
            """Broken: says its last map's size rounds down; it rounds up (a probe)."""
            return TwoStages(int(spec.options["width"]), floor=True)
        ''',
    "models/probe_model.py": '''
        import torch.nn.functional as F
        from torch import nn

        from mtpsl.models.base import MODELS, ModelOutput, MultiTaskModel, scaled


        class ProbeNet(MultiTaskModel):
            """One strided convolution, a 1x1 head per task."""

            def __init__(self, heads, width: float, full_size: bool = True) -> None:
                super().__init__()
                c = scaled(64, width)
                self.trunk = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU())
                self.heads = nn.ModuleDict({t: nn.Conv2d(c, h.channels, 1)
                                            for t, h in heads.items()})
                self.activations = {t: h.activation for t, h in heads.items()}
                self.full_size = full_size

            @property
            def tasks(self):
                return list(self.heads)

            def shared_parameters(self):
                return list(self.trunk.parameters())

            def forward(self, x):
                h = self.trunk(x)
                preds = {}
                for task, head in self.heads.items():
                    raw = head(h)
                    if self.full_size:
                        raw = F.interpolate(raw, size=x.shape[-2:], mode="bilinear")
                    preds[task] = self.activations[task](raw)
                return ModelOutput(preds, {"shared": h})


        @MODELS.register("probe_ok")
        def probe_ok(heads, width: float = 1.0) -> ProbeNet:
            """A one-layer network (a probe)."""
            return ProbeNet(heads, width)


        @MODELS.register("probe_broken")
        def probe_broken(heads, width: float = 1.0) -> ProbeNet:
            """Broken: predicts at half the input size (a probe)."""
            return ProbeNet(heads, width, full_size=False)
        ''',
    "methods/probe_method.py": '''
        from pydantic import BaseModel, ConfigDict

        from mtpsl.methods.base import METHODS, Losses, Method, supervised_losses


        class ScaleOptions(BaseModel):
            model_config = ConfigDict(extra="forbid")
            scale: float


        @METHODS.register("probe_ok")
        class Scaled(Method):
            """Eq. 1 times a required option, scale (a probe)."""

            Options = ScaleOptions
            contract_options = {"scale": 0.5}

            def compute(self, model, batch):
                out = model(batch.image)
                losses = supervised_losses(self.tasks, batch, out.preds)
                return Losses({t: self.options.scale * v for t, v in losses.items()}), out


        @METHODS.register("probe_broken")
        class PerImage(Method):
            """Broken: a loss per image instead of one per task (a probe)."""

            def compute(self, model, batch):
                out = model(batch.image)
                return Losses({n: t.loss(out.preds[n], batch.targets[n])
                               for n, t in self.tasks.items()}), out
        ''',
    "weighting/probe_weighting.py": '''
        from mtpsl.weighting.base import WEIGHTINGS, Weighting


        @WEIGHTINGS.register("probe_ok")
        class Halves(Weighting):
            """Every loss weighted 0.5 (a probe)."""

            linear_in_losses = True

            def combine(self, task_losses):
                return sum(0.5 * task_losses[t] for t in self.task_names)


        @WEIGHTINGS.register("probe_broken")
        class SelfNormalised(Weighting):
            """Broken: divides each loss by itself, so an absent task's 0 gives NaN (a probe)."""

            def combine(self, task_losses):
                return sum(v / v.detach() for v in task_losses.values())
        ''',
    "data/probe_dataset.py": '''
        from mtpsl.data.layout import DATASETS


        @DATASETS.register("probe_ok")
        def probe_ok(root, split, *, tasks=None, cache=False):
            """The NYUv2 layout under another name (a probe)."""
            return DATASETS.get("nyuv2")(root, split, tasks=tasks, cache=cache)
        ''',
    "data/probe_regime.py": '''
        import numpy as np

        from mtpsl.data.splits import REGIMES


        @REGIMES.register("probe_ok")
        def first_task_only(n, t, rng):
            """The first task on every image, no other (a probe)."""
            labelled = np.zeros((n, t), dtype=bool)
            labelled[:, 0] = True
            return labelled
        ''',
    "cli/commands/probe_command.py": '''
        def add_parser(subparsers):
            p = subparsers.add_parser("probe-command", help="a sub-command in its own file")
            p.set_defaults(func=lambda args: print("probe-command ran"))
        ''',
}
"""Plugin files by path inside the package: each contract kind has a correct entry
(``probe_ok``, needing its contract hook where the kind has one) and a broken one
(``probe_broken``)."""

PAIR = ("probe_ok", "probe_broken")
OUTSIDE = '''
from mtpsl.weighting import WEIGHTINGS, Weighting


@WEIGHTINGS.register("probe_outside")
class Outside(Weighting):
    """A weighting of another project, registered by importing it (a probe)."""

    linear_in_losses = True

    def combine(self, task_losses):
        return sum(task_losses.values())
'''
"""A module outside the package (``docs/extending.md``: import it, then call ``main``)."""

LISTED = {"tasks": PAIR, "metrics": (*PAIR, "probe_beside"), "encoders": PAIR, "models": PAIR,
          "methods": PAIR, "weightings": (*PAIR, "probe_outside"), "datasets": ("probe_ok",),
          "regimes": ("probe_ok",)}
"""What ``mtpsl list KIND`` must show of the probes."""

PASS = ["test_task_contract[probe_ok]", "test_metric_of_every_task_type[probe_ok]",
        "test_metric_contract[probe_ok]", "test_metric_contract[probe_beside]",
        "test_encoder_contract[probe_ok]", "test_model_contract[probe_ok]",
        "test_method_contract[probe_ok]", "test_weighting_contract[probe_ok]",
        "test_an_absent_task_is_as_if_it_did_not_exist[probe_ok]"]
"""Contract tests of ``test_registries.py`` that a correct entry passes."""

FAIL = {"test_task_contract[probe_broken]": "task.blank_like(target)",
        "test_metric_contract[probe_broken]": "first.compute() ==",
        "test_encoder_contract[probe_broken]": "enc.feature_size(",
        "test_model_contract[probe_broken]": "out.preds.items()",
        "test_method_contract[probe_broken]": "t.ndim == 0",
        "test_weighting_contract[probe_broken]": "math.isfinite(float(total))"}
"""Contract tests that a broken entry fails, with a piece of the check that must catch it
(its source line in the failure report)."""

LISTING = """
import contextlib, io, json
import mtpsl
import probe_outside
from mtpsl.cli import main
from mtpsl.data.splits import make_split

def run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue()

found = {"package": mtpsl.__file__, "help": run(["--help"]), "command": run(["probe-command"]),
         "split": make_split("probe_ok", 3, ("a", "b"), seed=0).labelled.tolist()}
found.update({kind: run(["list", kind]) for kind in KINDS})
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def plugged(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the package with the probe files, and the environment that imports it (and
    the module outside it) first."""
    src = tmp_path_factory.mktemp("plugged") / "src"
    outside = src.parent / "outside"
    outside.mkdir()
    (outside / "probe_outside.py").write_text(HEADER + OUTSIDE, encoding="utf-8")
    copy = src / "mtpsl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for relative, code in PLUGINS.items():
        path = copy / relative
        assert path.parent.is_dir() and not path.exists(), relative
        path.write_text(HEADER + textwrap.dedent(code), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(src), str(outside), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    return copy, env


def test_a_new_file_of_each_kind_is_registered_and_listed(plugged):
    copy, env = plugged
    script = LISTING.replace("KINDS", repr(list(LISTED)))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["package"]).resolve() == copy.resolve() / "__init__.py"  # not the tree
    for kind, names in LISTED.items():
        code, out = found[kind]
        assert code == 0, (kind, out)
        described = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
        assert all("(a probe)" in described.get(name, "") for name in names), (kind, out)
    code, out = found["help"]
    assert code == 0 and "probe-command" in out
    assert found["command"] == [0, "probe-command ran\n"]
    assert found["split"] == [[True, False]] * 3


def test_the_contract_tests_pass_a_correct_plugin_and_fail_a_broken_one(plugged, tmp_path):
    _, env = plugged
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
         "-k", "probe_", f"--junitxml={report}",
         f"--basetemp={tmp_path / 'basetemp'}", str(TESTS / "test_registries.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert report.is_file(), done.stdout + done.stderr
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = [child for child in case if child.tag in ("failure", "error", "skipped")]
        text = "" if not bad else f"{bad[0].get('message', '')}\n{bad[0].text or ''}"
        outcomes[case.get("name", "")] = (bad[0].tag if bad else "passed", text)
    for case in PASS:
        outcome, text = outcomes.get(case, ("not run", ""))
        assert outcome == "passed", f"{case}: {outcome}\n{text}\n{done.stdout}"
    for case, check in FAIL.items():
        outcome, text = outcomes.get(case, ("not run", ""))
        assert outcome == "failure", f"{case}: {outcome}\n{done.stdout}"
        assert check in text, f"{case} failed elsewhere:\n{text}"
