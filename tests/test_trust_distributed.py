"""Distributed faults under torchrun (issue 28, class 7): a rank killed, a rank stopped, a stop
signal that reaches one rank only. Real ``torchrun --nproc_per_node 2`` runs on CPU (gloo) with
tiny data, one step per epoch and many epochs, so a fault always lands mid-training; the fault
comes from outside (``kill`` on the rank's process, found by its ``RANK`` environment).

What torchrun itself reports is its own: it exits 1 whenever a worker exits non-zero or when it
receives SIGTERM itself, and prints a ``ChildFailedError`` summary with each worker's exit
status, which is where these tests read the workers' statuses. The fast tests at the end check
the one-line report itself without processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

import mtpsl
from mtpsl.core import distributed as ddp
from mtpsl.core.distributed import EXIT_PEER_LOST, DistEnv
from mtpsl.core.errors import ConfigError
from mtpsl.engine.checkpoint import load_checkpoint

from conftest import TINY

ARGS = [*TINY, "train.epochs=1000", "train.max_steps_per_epoch=1", "train.eval_every=1000",
        "train.checkpoint_every=1", "train.device=cpu"]
"""Epochs of one step that never end by themselves; a checkpoint after every epoch."""
MTPSL_SOURCE = str(Path(mtpsl.__file__).parent)
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def root(shared_layout) -> Path:
    return shared_layout(n=8, h=32, w=32)


class Torchrun:
    """``torchrun --standalone --nproc_per_node 2 -m mtpsl train`` with stderr in a file."""

    def __init__(self, tmp_path: Path, root: Path, *extra: str) -> None:
        self.run_dir = tmp_path / "run"
        self.log = tmp_path / "stderr.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "mtpsl", "train", "--run-dir", str(self.run_dir),
               f"dataset.root={root}", *ARGS, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("MTPSL_FAULT", None)
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 240.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.stderr(), re.MULTILINE)
            if found:
                return found
            assert self.proc.poll() is None, f"torchrun ended early:\n{self.stderr()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.stderr()[-3000:]}")

    def rank_pid(self, rank: int) -> int:
        """The worker process of ``rank`` (a child of torchrun with RANK=rank)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        for pid in map(int, children.split()):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return pid
        raise AssertionError(f"no worker of rank {rank} among {children}")

    def finish(self, timeout: float = 120.0) -> str:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.stderr()


def worker_status(err: str, rank: int) -> int:
    """A worker's exit status from torchrun's failure summary."""
    found = re.search(rf"rank\s*: {rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*: (-?\d+)", err)
    assert found, err[-3000:]
    return int(found.group(1))


def no_mtpsl_traceback(err: str) -> None:
    """torchrun prints its own traceback (ChildFailedError); none may come from mtpsl."""
    assert "internal error" not in err and f'File "{MTPSL_SOURCE}' not in err, err[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_rank_is_named_in_one_line_with_its_own_exit_status(root, tmp_path):
    """Guards ``ddp.peer_failure`` in ``Trainer.fit`` (and ``ddp.ignore_termination`` after
    it): rank 0 got gloo's "Connection reset by peer" as an internal-error traceback."""
    run = Torchrun(tmp_path, root, "train.dist_timeout_s=60")
    run.wait_for(r"^epoch 2/")
    os.kill(run.rank_pid(1), signal.SIGKILL)
    err = run.finish()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.fullmatch(r"error: lost rank 1 of 2 during [a-z-]+ \(connection (reset|closed); "
                        r"its process ended\); the last checkpoint is .*checkpoint\.pt \(epoch "
                        r"\d+\); continue with `torchrun \.\.\. mtpsl train --resume .*`",
                        lines[0]), lines[0]
    no_mtpsl_traceback(err)
    assert worker_status(err, 0) == EXIT_PEER_LOST
    epoch = int(re.search(r"\(epoch (\d+)\)", lines[0]).group(1))
    assert load_checkpoint(run.run_dir / "checkpoint.pt")["epoch"] == epoch


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stopped_rank_times_out_naming_the_key(root, tmp_path):
    """Guards ``timeout=`` in ``ddp.setup`` (``train.dist_timeout_s``): a SIGSTOPped rank left
    the others waiting in their next collective for torch's 30 minutes, silently."""
    run = Torchrun(tmp_path, root, "train.dist_timeout_s=8")
    run.wait_for(r"^epoch 2/")
    stopped = run.rank_pid(1)
    os.kill(stopped, signal.SIGSTOP)
    try:
        line = run.wait_for(r"^error: .*$", timeout=90).group(0)
    finally:
        os.kill(stopped, signal.SIGKILL)  # else torchrun waits 30 s for it before SIGKILL
    err = run.finish()
    assert re.match(r"error: lost rank 1 of 2: no answer within train\.dist_timeout_s=8 s "
                    r"during [a-z-]+ \(its process is stopped", line), line
    no_mtpsl_traceback(err)
    assert worker_status(err, 0) == EXIT_PEER_LOST


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_signal_to_one_rank_stops_every_rank_at_one_checkpoint(root, tmp_path):
    """Guards the agreed flag in ``Preemption.on_epoch_end``: a SIGTERM that reached rank 1
    after the epoch's last check stopped rank 1 alone (exit 75) while rank 0 went on and then
    reported rank 1 lost; torchrun forwards its SIGTERM to each worker in turn, so the
    workers can see it on either side of an epoch's end."""
    run = Torchrun(tmp_path, root, "train.dist_timeout_s=60")
    run.wait_for(r"^epoch 2/")
    os.kill(run.rank_pid(1), signal.SIGTERM)
    err = run.finish()
    assert "lost rank" not in err, err[-3000:]
    no_mtpsl_traceback(err)
    assert worker_status(err, 0) == worker_status(err, 1) == EXIT_PREEMPTED
    found = re.search(r"^error: stopped by a signal to another process after epoch (\d+); "
                      r"checkpoint written", err, re.MULTILINE)
    assert found, err[-3000:]
    state = load_checkpoint(run.run_dir / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (int(found.group(1)), 0)


# --------------------------------------------------------------------- the report (fast)


def _gone_process() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid  # reaped: no such process any more


@pytest.fixture
def peers(monkeypatch):
    """Rank 0 is this process; rank 1 is given by the test."""
    def set_rank1(pid: int) -> None:
        host = socket.gethostname()
        monkeypatch.setattr(ddp, "_peers", [ddp._Peer(host, os.getpid()), ddp._Peer(host, pid)])
    return set_rank1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_report_names_the_lost_rank_and_the_collective(peers):
    """Guards ``ddp.peer_failure``: the gloo error becomes one line naming rank, state and
    the collective; an error that is no lost peer keeps its traceback (None)."""
    peers(_gone_process())
    env = DistEnv(rank=0, world=2)
    reset = dist.DistBackendError("[gloo/transport/tcp/pair.cc:545] Read error: Connection "
                                  "reset by peer")
    lost = ddp.peer_failure(reset, env, "see RUN")
    assert lost is not None and lost.exit_code == EXIT_PEER_LOST
    assert str(lost) == ("lost rank 1 of 2 during a collective (connection reset; its process "
                         "ended); see RUN")
    assert ddp.peer_failure(RuntimeError("Connection reset by peer"), env) is None  # no c10d
    assert ddp.peer_failure(reset, DistEnv()) is None  # one process: no peers


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_timeout_names_the_key_and_a_stopped_peer(peers, monkeypatch):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        peers(sleeper.pid)
        monkeypatch.setattr(ddp, "_timeout_s", 5.0)
        timeout = dist.DistBackendError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                                        "waiting 5000ms for recv operation to complete")
        lost = ddp.peer_failure(timeout, DistEnv(rank=0, world=2))
        assert lost is not None
        assert str(lost) == ("lost rank 1 of 2: no answer within train.dist_timeout_s=5 s "
                             "during a collective (its process is stopped)")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_collective_timeout_is_a_bounded_key():
    from mtpsl.core.config import load_config

    assert load_config("synthetic_demo").train.dist_timeout_s == 600
    assert load_config("synthetic_demo", ["train.dist_timeout_s=8"]).train.dist_timeout_s == 8
    for bad in ("0", "-1", "1e9", "nan"):
        with pytest.raises(ConfigError, match=r"train\.dist_timeout_s"):
            load_config("synthetic_demo", [f"train.dist_timeout_s={bad}"])
