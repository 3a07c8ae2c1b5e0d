"""Fault injection into a real ``mtpsl train`` process, then resume: nothing lost, nothing doubled.

Each case starts the CLI as a subprocess with ``MTPSL_FAULT`` (see :mod:`mtpsl.core.faults`): a
SIGKILL mid-step, mid-epoch, in evaluation and inside each file write; a SIGTERM/SIGUSR1
preemption mid-epoch and during evaluation (twice in a row, too); a full disk while writing
the checkpoint. Then ``mtpsl train --resume`` is run until the run completes, and the final
checkpoint, metrics.jsonl, metrics.csv, final_metrics.json and the TensorBoard scalars must
equal those of one uninterrupted run bitwise (CPU, one thread).

Guards: engine.trainer.Trainer and the Preemption / Checkpointing callbacks (mid-epoch
checkpoints), sampling.ResumableSampler (the sampler position), engine.build.train_loader's own
generator (the RNG stream), the TensorBoard callback (no duplicate points), History.load (rows
after the checkpoint dropped), files.atomic_write (a kill or ENOSPC mid-write keeps the old
file).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mtpsl.core.errors import EXIT_ERROR, EXIT_PREEMPTED
from mtpsl.core.files import stale_temps
from mtpsl.engine.checkpoint import load_checkpoint

from conftest import TINY, assert_same_state

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")

# 12 images, batch 2: 6 steps per epoch; 3 epochs; checkpoints after epochs 2 and 3 only, so
# a kill in epoch 3 has logged a row (epoch 3's, from a killed try) the checkpoint has not.
ARGS = [*TINY, "train.epochs=3", "train.eval_every=1", "train.checkpoint_every=2",
        "train.device=cpu", "optim.lr=1e-3", "train.eval_batch_size=4"]
TIMEOUT = 300


def _env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MTPSL_FAULT", None)
    if fault:
        env["MTPSL_FAULT"] = fault
    return env


def _mtpsl(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtpsl", *args], env=_env(fault),
                          capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=_interruptible)


def _interruptible() -> None:
    """The child's SIGINT at its default, as in a terminal: a suite started in the background
    (``cmd &`` from a script) hands its processes SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so an injected Ctrl-C would pass unnoticed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _scalars(run: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return sorted((tag, e.step, e.value) for tag in acc.Tags()["scalars"]
                  for e in acc.Scalars(tag))


def _final(run: Path) -> dict:
    final = json.loads((run / "final_metrics.json").read_text())
    final.pop("train_seconds_this_session")
    return final


@pytest.fixture(scope="module")
def data(shared_layout) -> Path:
    return shared_layout(n=12, h=32, w=32)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    done = _mtpsl("train", "--run-dir", str(run), f"dataset.root={data}", *ARGS)
    assert done.returncode == 0, done.stderr
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    full = load_checkpoint(reference / "checkpoint.pt")
    part = load_checkpoint(run / "checkpoint.pt")
    assert_same_state(full, part)  # model, method, weighting, optimiser, RNG, identity
    for name in ("metrics.jsonl", "metrics.csv", "config.yaml", "split.json"):
        assert (run / name).read_text() == (reference / name).read_text(), name
    assert _final(run) == _final(reference)
    scalars = _scalars(run)
    assert len(scalars) == len({(tag, step) for tag, step, _ in scalars}), "duplicate points"
    assert scalars == _scalars(reference)
    assert stale_temps(run / "checkpoint.pt") == []


CASES = {
    # name: (fault, expected exit status of the faulted process)
    "kill mid-step, epoch 1 (no checkpoint yet)": ("KILL@backward#4", -signal.SIGKILL),
    "kill mid-epoch 3": ("KILL@step#15", -signal.SIGKILL),
    "kill in evaluation": ("KILL@eval#4", -signal.SIGKILL),
    "kill writing the checkpoint": ("KILL@write:checkpoint.pt#2", -signal.SIGKILL),
    "kill writing metrics.jsonl": ("KILL@write:metrics.jsonl#3", -signal.SIGKILL),
    "kill writing final_metrics.json": ("KILL@write:final_metrics.json#1", -signal.SIGKILL),
    "kill writing metrics.csv": ("KILL@write:metrics.csv#2", -signal.SIGKILL),
    "kill writing split.json": ("KILL@write:split.json#1", -signal.SIGKILL),
    "kill writing config.yaml": ("KILL@write:config.yaml#1", -signal.SIGKILL),
    "SIGTERM mid-epoch 1": ("TERM@step#3", EXIT_PREEMPTED),
    "SIGUSR1 mid-epoch 3": ("USR1@step#14", EXIT_PREEMPTED),
    "SIGTERM in evaluation": ("TERM@eval#1", EXIT_PREEMPTED),
    "disk full writing the checkpoint": ("ENOSPC@write:checkpoint.pt#2", EXIT_ERROR),
}


def _case(fault: str, data: Path, run: Path) -> dict:
    """One case: the faulted run, what it left behind, then ``--resume`` (and the fresh start
    that resume asks for when the run was killed before it began)."""
    hit = _mtpsl("train", "--run-dir", str(run), f"dataset.root={data}", *ARGS, fault=fault)
    checkpoint = run / "checkpoint.pt"
    left = {"final": (run / "final_metrics.json").exists(),
            "epoch": load_checkpoint(checkpoint)["epoch"] if checkpoint.exists() else None}
    resumed = _mtpsl("train", "--resume", str(run))
    restarted = (_mtpsl("train", "--run-dir", str(run), f"dataset.root={data}", *ARGS)
                 if "config.yaml" in fault else None)
    return {"hit": hit, "left": left, "resumed": resumed, "restarted": restarted}


def _position(run: Path) -> tuple[int, int]:
    state = load_checkpoint(run / "checkpoint.pt")
    return state["epoch"], state["step"]


def _preempted_twice(data: Path, base: Path) -> dict:
    run = base / "run"
    first = _mtpsl("train", "--run-dir", str(run), f"dataset.root={data}", *ARGS,
                   fault="TERM@step#2")
    after_first = _position(run) if first.returncode == EXIT_PREEMPTED else None
    second = _mtpsl("train", "--resume", str(run), fault="TERM@step#7")
    after_second = _position(run) if second.returncode == EXIT_PREEMPTED else None
    last = _mtpsl("train", "--resume", str(run))
    return {"run": run, "hits": [first, second], "positions": [after_first, after_second],
            "resumed": last}


def _preempted_with_own_reference(extra: list[str], fault: str, data: Path, base: Path) -> dict:
    """A reference run of ``ARGS + extra``, the same run preempted by ``fault``, resumed."""
    args = [f"dataset.root={data}", *ARGS, *extra]
    reference, run = base / "reference", base / "run"
    ref = _mtpsl("train", "--run-dir", str(reference), *args)
    hit = _mtpsl("train", "--run-dir", str(run), *args, fault=fault)
    position = _position(run) if hit.returncode == EXIT_PREEMPTED else None
    resumed = _mtpsl("train", "--resume", str(run))
    return {"reference": reference, "run": run, "ref": ref, "hit": hit, "position": position,
            "resumed": resumed}


SCENARIOS: dict[str, Callable[[Path, Path], dict]] = {
    "preempted twice": _preempted_twice,
    "direct_map draws random numbers": functools.partial(
        _preempted_with_own_reference,
        ["method.name=direct_map", "method.options={mapping_width: 0.0625}"], "TERM@step#9"),
    "inside an accumulation group": functools.partial(
        _preempted_with_own_reference, ["train.accumulate=3"], "TERM@step#2"),
}
"""Chains of three runs each, started first in the pool below (they take longest)."""


@pytest.fixture(scope="module")
def fault_runs(data, tmp_path_factory) -> dict[str, dict]:
    """Every scenario of SCENARIOS and case of CASES, two at a time: each process uses one
    thread and the runs are independent (faults fire at counted events, not at times), so the
    machine's two cores halve the wall time of the module."""
    base = tmp_path_factory.mktemp("cases")

    def run_job(index_and_name: tuple[int, str]) -> dict:
        index, name = index_and_name
        if name in SCENARIOS:
            return SCENARIOS[name](data, base / f"scenario{index}")
        run = base / f"case{index}" / "run"
        return {"run": run, **_case(CASES[name][0], data, run)}

    names = [*SCENARIOS, *CASES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(run_job, enumerate(names)), strict=True))


# The tests of fault_runs are the slow tier (16 chains of subprocess runs); the Ctrl-C test
# below keeps a faulted subprocess run in the fast tier.
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fault_then_resume_equals_an_uninterrupted_run(name, fault_runs, reference):
    fault, status = CASES[name]
    case = fault_runs[name]
    run, hit, left = case["run"], case["hit"], case["left"]
    assert hit.returncode == status, hit.stderr
    assert not left["final"] or "final_metrics" in fault
    if status > 0:
        last = hit.stderr.strip().splitlines()[-1]  # after the per-epoch progress lines
        assert "Traceback" not in hit.stderr and last.startswith("error: "), hit.stderr
    if status == EXIT_PREEMPTED:
        assert "--resume" in hit.stderr and left["epoch"] is not None
    if "ENOSPC" in fault:
        assert "No space left on device" in hit.stderr
        assert left["epoch"] == 2  # the old checkpoint survived
    resumed = case["resumed"]
    if "config.yaml" in fault:  # killed before the run began: resume says to start it again
        assert resumed.returncode == EXIT_ERROR and "start it again" in resumed.stderr
        resumed = case["restarted"]
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(run, reference)


@pytest.mark.slow
def test_preempted_twice_then_resumed_equals_an_uninterrupted_run(fault_runs, reference):
    chain = fault_runs["preempted twice"]
    first, second = chain["hits"]
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    assert chain["positions"][0] == (0, 2)  # mid-epoch, sampler position 2
    assert second.returncode == EXIT_PREEMPTED, second.stderr
    assert chain["positions"][1] == (1, 3)
    assert chain["resumed"].returncode == 0
    _assert_same_run(chain["run"], reference)


def test_ctrl_c_says_where_the_checkpoint_is_and_exits_130(data, tmp_path):
    run = tmp_path / "run"
    hit = _mtpsl("train", "--run-dir", str(run), f"dataset.root={data}", *ARGS,
                 fault="INT@step#15")
    assert hit.returncode == 130, hit.stderr
    assert "Traceback" not in hit.stderr
    assert f"{run / 'checkpoint.pt'} (epoch 2)" in hit.stderr and "--resume" in hit.stderr


def _check_preempted_with_own_reference(chain: dict) -> None:
    assert chain["ref"].returncode == 0
    assert chain["hit"].returncode == EXIT_PREEMPTED, chain["hit"].stderr
    assert chain["resumed"].returncode == 0
    _assert_same_run(chain["run"], chain["reference"])


@pytest.mark.slow
def test_preempting_a_method_that_draws_random_numbers_keeps_its_stream(fault_runs):
    """direct_map draws Gumbel samples from the global RNG every step: the resumed stream
    must continue where the preempted one stopped (guards the mid-epoch RNG state and
    train_loader's own generator, which keeps iterator start-up off the global RNG)."""
    _check_preempted_with_own_reference(fault_runs["direct_map draws random numbers"])


@pytest.mark.slow
def test_preempted_inside_an_accumulation_group_stops_after_its_optimiser_step(fault_runs):
    """With train.accumulate=3 a stop requested after micro-batch 1 is honoured after
    micro-batch 2, the group's last (the summed gradient is never lost), and resuming from
    there equals the uninterrupted run."""
    chain = fault_runs["inside an accumulation group"]
    assert chain["hit"].returncode == EXIT_PREEMPTED, chain["hit"].stderr
    assert chain["position"] == (0, 3)
    _check_preempted_with_own_reference(chain)
