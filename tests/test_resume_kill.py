"""Real kills (SIGKILL from outside): mid-epoch, then resume; mid-checkpoint-write.

Every process here is a subprocess we start ourselves, so a kill is a real one: no ``finally``,
no atexit, no flush. Timing is only used to decide *when* to kill; what is asserted never
depends on where exactly the kill landed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mtpsl.checkpoint import load_checkpoint, save_checkpoint, stale_temps

from conftest import assert_same_state, make_layout

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

EPOCHS = 4
ARGS = ["model.width=0.0625", f"train.epochs={EPOCHS}", "train.batch_size=2",
        "train.eval_every=100", "train.checkpoint_every=1", "train.progress=false",
        "train.device=cpu", "optim.lr=1e-3"]
TIMEOUT = 300  # seconds; generous for a loaded 2-core machine


def _env() -> dict[str, str]:
    # one thread per process: the reference and the killed run go side by side on 2 cores,
    # and both runs of a comparison use the same kernels
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def _mtpsl(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mtpsl", *args], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = TIMEOUT,
              poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"process exited ({proc.returncode}) before {path.name} appeared:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(poll)


def _epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tmp_path):
    root = make_layout(tmp_path, n=48, h=32, w=48)  # 24 steps per epoch
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _mtpsl("train", "--run-dir", str(ref_dir), f"dataset.root={root}", *ARGS)
    victim = _mtpsl("train", "--run-dir", str(run_dir), f"dataset.root={root}", *ARGS)
    try:
        # The first checkpoint appears at the end of epoch 1 (renamed into place, so complete).
        # Killing 50 ms after it lands a few steps into epoch 2: the other EPOCHS-1 epochs
        # (72 steps, ~0.4 s per epoch here) take far longer than the delay, and load only
        # slows them down, so the kill always comes before the run could finish.
        _wait_for(run_dir / "checkpoint.pt", victim, poll=0.005)
        time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=TIMEOUT)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it was killed"
    killed_at = load_checkpoint(run_dir / "checkpoint.pt")["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert not (run_dir / "final_metrics.json").exists()

    resumed = _mtpsl("train", "--resume", str(run_dir))
    _finish(reference)
    _finish(resumed)

    full = load_checkpoint(ref_dir / "checkpoint.pt")
    part = load_checkpoint(run_dir / "checkpoint.pt")
    assert part["epoch"] == full["epoch"] == EPOCHS
    for key in ("model", "method", "weighting", "optim"):
        assert_same_state(full[key], part[key], key)
    assert_same_state(full, part)  # and everything else (config, rng state)
    assert _epochs(run_dir) == list(range(1, EPOCHS + 1))
    # the per-epoch metrics themselves are identical too, epochs before and after the kill
    assert (run_dir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    assert stale_temps(run_dir / "checkpoint.pt") == []


_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from mtpsl import checkpoint

    path, marker = Path(sys.argv[1]), Path(sys.argv[2])
    checkpoint.save_checkpoint({"epoch": 1, "w": torch.arange(10.0)}, path)
    print("first written", flush=True)

    class SlowFile:
        # forwards writes to the temp file; once 1 MB is on disk it signals and stalls
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, data):
            self.f.write(data)
            self.n += len(memoryview(data).cast("B"))
            if self.n > 1 << 20:
                self.f.flush()
                marker.write_text(str(self.n))
                time.sleep(600)
            return len(memoryview(data).cast("B"))
        def flush(self):
            self.f.flush()

    real_write = checkpoint.atomic_write  # the file write, after in-memory serialisation
    checkpoint.atomic_write = lambda p, write: real_write(p, lambda f: write(SlowFile(f)))
    big = {"epoch": 2, "w": torch.zeros(4 << 20)}  # 16 MB
    checkpoint.save_checkpoint(big, path)
    print("second written (should have been killed)", flush=True)
    """
)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path, marker = tmp_path / "run" / "checkpoint.pt", tmp_path / "mid-write"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), str(marker)], env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for(marker, proc)
        first_bytes = path.read_bytes()
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, out
    assert "first written" in out and "second written" not in out

    # The previous checkpoint is untouched and loads; the partial write is only a temp file.
    assert path.read_bytes() == first_bytes
    state = load_checkpoint(path, required={})
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(10.0))
    leftovers = stale_temps(path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 1 << 20
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name, leftovers[0].name]
    )

    # The next write of the same checkpoint cleans the leftover up.
    save_checkpoint({"epoch": 3, "w": torch.ones(3)}, path)
    assert stale_temps(path) == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert load_checkpoint(path, required={})["epoch"] == 3


def test_stale_temp_cleanup_only_touches_this_files_temps(tmp_path):
    path = tmp_path / "checkpoint.pt"
    keep = [tmp_path / ".checkpoint.pt.bak.abcdefgh.tmp", tmp_path / ".other.pt.abcdefgh.tmp",
            tmp_path / ".checkpoint.pt.abc.tmp", tmp_path / "checkpoint.pt.abcdefgh.tmp"]
    stale = tmp_path / ".checkpoint.pt.a1_b2c3d.tmp"
    for p in [*keep, stale]:
        p.write_bytes(b"partial")
    save_checkpoint({"epoch": 1}, path)
    assert not stale.exists()
    assert all(p.exists() for p in keep)
