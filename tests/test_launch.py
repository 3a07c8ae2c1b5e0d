"""``compare`` beyond one process: ``--jobs N`` on this machine and one submitit job per cell.

End to end on real processes (CPU, one thread per cell, tiny data): a 2x2x2 grid through
submitit's local executor with one cell preempted mid-epoch by SIGTERM (requeued by submitit,
continued from its checkpoint) and one failing (reported with its log, then resubmitted alone
by running compare again), and ``--jobs 2``; both give the tables and per-cell metrics of the
sequential grid, bitwise. Without training: the states ``--status`` derives from the cells'
event logs, the slots of ``--jobs`` (GPUs, threads, cores), the job a SLURM submission asks
for (a stand-in ``sbatch`` on the PATH) and the config's checks.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mtpsl.analysis.grid import Cell
from mtpsl.analysis.launch.local import cell_command, plan_slots
from mtpsl.analysis.launch.state import (
    cell_status,
    events,
    record,
    write_manifest,
)
from mtpsl.cli import main
from mtpsl.core.config import Config, LauncherConfig, load_config
from mtpsl.core.errors import EXIT_PREEMPTED, ConfigError

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX processes")

GRID = ["--methods", "stl,sl", "--regimes", "onelabel,random", "--seeds", "0,1"]
TINY = ["train.epochs=2", "train.batch_size=4", "train.amp=off", "model.width=0.0625",
        "train.progress=false"]
# 8 training images in batches of 4: 2 steps an epoch; step 3 is mid-epoch 2
PREEMPTED, FAILED = "onelabel/sl/seed0", "random/stl/seed1"
SUBMITIT = ["--launcher", "submitit"]
LOCAL_EXECUTOR = ["compare.launcher.cluster=local", "compare.launcher.gpus_per_cell=0",
                  "compare.launcher.cpus_per_cell=1", "compare.launcher.time_min=60"]
TIMEOUT = 600


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTPSL_", "SUBMITIT_"))}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _compare(data: Path, out: Path, *args: str, overrides: tuple[str, ...] = (),
             env: dict[str, str] | None = None, stop_when: Callable[[], bool] | None = None
             ) -> subprocess.CompletedProcess:
    """``mtpsl compare`` in a process of its own, its output in files (the local executor's
    processes outlive it and would hold a pipe open); SIGTERM once ``stop_when()``."""
    argv = [sys.executable, "-m", "mtpsl", "compare", "--config", "synthetic_demo", "--out",
            str(out), *args, f"dataset.root={data}", *TINY, *overrides]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        process = subprocess.Popen(argv, env=env or _env(), stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + TIMEOUT
            while stop_when is not None and process.poll() is None and not stop_when():
                assert time.monotonic() < deadline
                time.sleep(0.1)
            if stop_when is not None:
                process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=TIMEOUT)
        finally:
            if process.poll() is None:  # a failed test leaves no compare behind
                process.kill()
                process.wait()
    return subprocess.CompletedProcess(argv, code, Path(f"{out}.stdout").read_text(),
                                       Path(f"{out}.stderr").read_text())


def _status(out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "mtpsl", "compare", "--status", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cells(out: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(out)) for p in out.rglob("config.yaml"))


def _same_cell(run: Path, reference: Path) -> None:
    """Bitwise the same training: every epoch's metrics and the final ones."""
    assert (run / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    final, ref = (json.loads((p / "final_metrics.json").read_text()) for p in (run, reference))
    assert final["metrics"] == ref["metrics"]
    assert final["setup_signature"] == ref["setup_signature"]
    assert final["pairing"] == ref["pairing"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from mtpsl.data.synthetic import write_nyuv2_layout

    # what `mtpsl data synth --out D --n-train 8 --n-val 4 --height 32 --width 48` writes
    return write_nyuv2_layout(tmp_path_factory.mktemp("launch") / "D", n_train=8, n_val=4,
                              height=32, width=48, progress=False)


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory) -> Path:
    """The 2x2x2 grid one cell after another in one process, one thread."""
    out = tmp_path_factory.mktemp("sequential") / "grid"
    done = _compare(data, out, *GRID)
    assert done.returncode == 0, done.stderr
    return out


# -- states, slots, parameters: no training ---------------------------------------------------

def _manifest(out: Path, keys: list[str]) -> None:
    cells = [{"key": k, "regime": k.split("/")[0], "method": k.split("/")[1],
              "seed": int(k.split("/")[2].removeprefix("seed"))} for k in keys]
    write_manifest(out, Config().model_dump(mode="json"), cells)


def test_status_reads_each_state_from_the_cells_events(tmp_path):
    keys = [f"onelabel/sl/seed{k}" for k in range(7)]
    _manifest(tmp_path, keys)
    me = {"host": socket.gethostname()}
    for k, key in enumerate(keys[1:], 1):
        record(tmp_path, key, "submitted", job=f"j{k}", launcher="local", log=f"L{k}", **me)
    record(tmp_path, keys[2], "started", job="j2", **me)  # running
    for key, job in ((keys[3], "j3"), (keys[4], "j4")):
        record(tmp_path, key, "started", job=job, **me)
        record(tmp_path, key, "stopped", job=job, reason="SIGTERM")
    record(tmp_path, keys[5], "started", job="j5", **me)
    record(tmp_path, keys[5], "failed", job="j5", error="OSError: disk full")
    record(tmp_path, keys[6], "started", job="j6", **me)  # then the process died
    (tmp_path / keys[6]).mkdir(parents=True)
    (tmp_path / keys[6] / "metrics.jsonl").write_text('{"epoch": 1}\n')
    live = {"j1", "j2", "j3"}  # j1 queued, j3 waits to be requeued, j4 and j6 are gone

    def alive(submitted):
        return submitted["job"] in live

    got = {key: cell_status(tmp_path, key, 2, alive) for key in keys}
    states = [(s.state, s.active) for s in got.values()]
    assert states == [("pending", False), ("pending", True), ("running", True),
                      ("pending", True), ("pending", False), ("failed", False),
                      ("failed", False)]
    assert got[keys[0]].detail == "not launched yet" and got[keys[1]].detail == "queued"
    assert "stopped 1x (SIGTERM), requeued" in got[keys[3]].detail
    assert got[keys[5]].detail == "OSError: disk full; log: L5"
    assert "killed? out of memory?" in got[keys[6]].detail and got[keys[6]].epochs == "1/2"
    (tmp_path / keys[4]).mkdir(parents=True)
    (tmp_path / keys[4] / "final_metrics.json").write_text("{}")
    assert cell_status(tmp_path, keys[4], 2, alive).state == "done"  # whoever finished it


def test_a_torn_event_line_is_skipped(tmp_path):
    record(tmp_path, "a/b/seed0", "submitted", job="1")
    with open(tmp_path / "launch" / "cells" / "a/b/seed0.jsonl", "a") as f:
        f.write('{"event": "sta')  # a writer killed mid-line
    assert [e["event"] for e in events(tmp_path, "a/b/seed0")] == ["submitted"]


def test_status_of_a_folder_that_is_no_grid_says_so(tmp_path, capsys):
    assert main(["compare", "--status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a compare grid" in err and "mtpsl report" in err


def test_slots_pin_each_cell_to_its_own_gpus_threads_and_cores():
    slots = plan_slots(LauncherConfig(jobs=2, gpus_per_cell=2), ["0", "1", "2", "3"],
                       list(range(16)))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    assert [(s.processes, s.threads) for s in slots] == [(2, 4), (2, 4)]  # 8 cores, 2 ranks
    assert [s.cores for s in slots] == [tuple(range(8)), tuple(range(8, 16))]
    command = cell_command(Path("OUT"), Cell("onelabel", "sl", 0), "job-1", slots[1])
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[5:] == ["-m", "mtpsl.analysis.launch", "OUT", "onelabel/sl/seed0", "--job",
                           "job-1", "--threads", "4", "--cores", "8,9,10,11,12,13,14,15"]
    cpu = plan_slots(LauncherConfig(jobs=2), [], [0, 1], "cpu")
    assert [(s.threads, s.cores, s.env) for s in cpu] == [
        (1, (0,), {"CUDA_VISIBLE_DEVICES": ""}), (1, (1,), {"CUDA_VISIBLE_DEVICES": ""})]
    shared = plan_slots(LauncherConfig(jobs=4, cpus_per_cell=2), [], [0, 1], "cpu")
    assert all(s.cores == () and s.threads == 2 for s in shared)  # too few cores to own
    with pytest.raises(ConfigError, match=r"compare.launcher.jobs: 3 cells at once with 2 GPU"):
        plan_slots(LauncherConfig(jobs=3, gpus_per_cell=2), ["0", "1", "2", "3"], [0])


def test_launcher_keys_fail_fast_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"compare\.launcher\.name: Input should be "
                       r"'local' or 'submitit'"):
        load_config("synthetic_demo", ["compare.launcher.name=slurm"])
    assert main(["compare", "--config", "synthetic_demo", "--out", str(tmp_path / "g"),
                 "--launcher", "submitit", "--jobs", "2"]) == 2
    assert "compare.launcher.jobs: 2 is for the local launcher" in capsys.readouterr().err
    assert main(["compare", "--jobs", "0", "--out", str(tmp_path / "g")]) == 2
    assert "compare.launcher.jobs" in capsys.readouterr().err


def test_without_submitit_the_error_says_what_to_install(monkeypatch):
    from mtpsl.analysis.launch.cluster import import_submitit

    monkeypatch.setitem(sys.modules, "submitit", None)  # what an absent package gives
    with pytest.raises(ConfigError, match=r"compare\.launcher\.name: submitit needs .* pip "
                       r"install 'mtpsl\[cluster\]'"):
        import_submitit()


def test_a_slurm_submission_asks_for_the_configured_job(data, tmp_path):
    """A stand-in ``sbatch`` (and ``srun``, which submitit looks for) on the PATH: the job
    array compare submits, its sbatch header, and ``--status`` listing the queued cells."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sbatch\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "grid"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = _compare(data, out, *GRID, *SUBMITIT, env=env, overrides=(
        "compare.launcher.partition=gpu", "compare.launcher.time_min=720",
        "compare.launcher.gpus_per_cell=2", "compare.launcher.cpus_per_cell=16",
        "compare.launcher.mem_gb=64", "compare.launcher.array_parallelism=4",
        "compare.launcher.slurm={account: proj}"))
    assert done.returncode == 0, done.stderr
    assert "submitted 8 cell(s) to slurm (jobs 4242_0 … 4242_7)" in done.stderr
    assert f"mtpsl compare --status {out}" in done.stdout
    header = (tmp_path / "job.sbatch").read_text()
    for line in ("--partition=gpu", "--time=720", "--gpus-per-node=2", "--ntasks-per-node=2",
                 "--cpus-per-task=8", "--mem=64GB", "--array=0-7%4", "--account=proj",
                 "--signal=USR2@90"):
        assert f"#SBATCH {line}\n" in header, line
    status = _status(out)
    assert "launcher submitit (slurm): 8 pending, 0 running, 0 done, 0 failed" in status
    assert "onelabel/sl/seed0   pending  4242_2" in status
    assert not (out / "onelabel").exists()  # nothing trained here


# -- real grids -------------------------------------------------------------------------------

@pytest.mark.slow  # 4 cells, two at a time, stopped and continued: ~1 min on 2 cores
def test_jobs_2_on_the_cpu_gives_the_sequential_table(data, sequential, tmp_path):
    """Stopped by SIGTERM while its first cells train (each writes its checkpoint, compare
    exits 75), then run again: the table of the sequential grid's runs of the same cells."""
    from mtpsl.analysis import report
    from mtpsl.analysis.grid import load_results

    out = tmp_path / "grid"
    args = ("--methods", "stl,sl", "--regimes", "onelabel", "--seeds", "0,1", "--jobs", "2")
    stopped = _compare(data, out, *args, stop_when=lambda: len(_started(out)) == 2)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert "compare stopped by SIGTERM: stopped 2 running cell(s)" in stopped.stderr
    done = _compare(data, out, *args)
    assert done.returncode == 0, done.stderr
    cells = _cells(out)
    assert cells == ["onelabel/sl/seed0", "onelabel/sl/seed1", "onelabel/stl/seed0",
                     "onelabel/stl/seed1"]
    spans = []
    for key in cells:
        _same_cell(out / key, sequential / key)
        final = json.loads((out / key / "final_metrics.json").read_text())
        assert final["name"] == key.replace("/", "-")  # each cell trained in its own folder
        env = final["environment"]
        assert env["threads"] == 1 and env["host"] == socket.gethostname() and env["gpu"] is None
        mine = _spans(out, key)
        assert env["job_id"] == mine[-1][2]
        # a cell's jobs one after another, never two at once in its folder
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(mine)), mine
        spans += mine
    spans.sort()
    assert spans[1][0] < spans[0][1], "the first two cells did not train at the same time"
    # the table the sequential grid's runs of the same cells give
    config = load_config("synthetic_demo", [f"dataset.root={data}", *TINY,
                                            "compare.methods=[stl,sl]",
                                            "compare.regimes=[onelabel]", "compare.seeds=[0,1]"])
    grid = config.compare
    tables = report.build_tables(load_results(config, sequential), grid.baseline,
                                 grid.delta_metrics)
    expected = report.tables_markdown(tables, grid.baseline, grid.contrasts)
    assert (out / "results.md").read_text() == expected + "\n"
    assert done.stdout == expected + "\n"
    assert "== cell 3 of 4: onelabel/sl/seed0 started" in done.stderr


def _started(out: Path) -> list[str]:
    folder = out / "launch" / "cells"
    return [str(p) for p in folder.rglob("*.jsonl") if '"started"' in p.read_text()] \
        if folder.is_dir() else []


def _spans(out: Path, key: str) -> list[tuple[float, float, str]]:
    """(start, end, job) of each job that trained the cell, by the cell's events."""
    log = [e for e in events(out, key) if e["event"] != "submitted"]
    spans = []
    for e in log:
        if e["event"] == "started":
            end = next(f["time"] for f in log if f["job"] == e["job"] and f["time"] >= e["time"]
                       and f["event"] in ("done", "stopped", "failed"))
            spans.append((e["time"], end, e["job"]))
    return sorted(spans)


@pytest.mark.slow  # 8 jobs at once on 2 cores, a requeue and a resubmission: ~2 min
def test_submitit_grid_requeues_the_preempted_cell_resubmits_the_failed_one(data, sequential,
                                                                            tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "grid"
    faults = f"{PREEMPTED}=TERM@step#3;{FAILED}=ENOSPC@step#2"
    first = _compare(data, out, *GRID, *SUBMITIT, "--wait", overrides=LOCAL_EXECUTOR,
                     env=_env(MTPSL_CELL_FAULT=faults))
    assert first.returncode == 2
    assert f"1 cell(s) failed: {FAILED} (OSError: [Errno 28] No space left on device" \
        in first.stderr and "_0_log.err); run the same compare again" in first.stderr
    status = _status(out)
    assert "0 pending, 0 running, 7 done, 1 failed" in status
    line = {row.split()[0]: row for row in status.splitlines() if row.startswith(("one", "ran"))}
    assert line[FAILED].split()[1] == "failed" and "log: " in line[FAILED]
    log_path = Path(line[FAILED].rsplit("log: ", 1)[1])
    assert "No space left on device" in log_path.read_text()
    preempted = line[PREEMPTED].split()
    assert preempted[1:2] + preempted[4:] == ["done", "2", "2/2", "stopped", "1x", "(SIGTERM),",
                                              "requeued"]
    # one job: stopped by SIGTERM mid-epoch, requeued by submitit, continued to the end
    # (its launcher may record the submission after the job has started)
    log = events(out, PREEMPTED)
    assert len({e["job"] for e in log}) == 1
    assert [e["event"] for e in log if e["event"] != "submitted"] == [
        "started", "stopped", "started", "done"]
    assert not (out / "results.md").exists()  # not before the last cell

    again = _compare(data, out, *GRID, *SUBMITIT, overrides=LOCAL_EXECUTOR)  # no fault now
    assert again.returncode == 0, again.stderr
    assert "submitted 1 cell(s) to local" in again.stderr
    assert [e["event"] for e in events(out, FAILED)].count("submitted") == 2
    for key in _cells(sequential):
        if key != FAILED:
            assert [e["event"] for e in events(out, key)].count("submitted") == 1, key
    job = next(e["job"] for e in reversed(events(out, FAILED)) if e["event"] == "submitted")
    _wait_for_job(int(job))
    # the last cell's job wrote the tables: those of the sequential grid
    assert (out / "results.md").read_text() == (sequential / "results.md").read_text()
    assert _csv(out) == _csv(sequential)
    for key in _cells(sequential):
        _same_cell(out / key, sequential / key)
    env = json.loads((out / FAILED / "final_metrics.json").read_text())["environment"]
    assert env["job_id"] == job and env["threads"] == 1
    assert "0 pending, 0 running, 8 done, 0 failed" in _status(out)


def _wait_for_job(pid: int) -> None:
    """Until the local executor's controller process ``pid`` has ended."""
    from mtpsl.analysis.launch.state import pid_alive

    deadline = time.monotonic() + TIMEOUT
    while pid_alive(pid):
        assert time.monotonic() < deadline, "the resubmitted job did not end"
        time.sleep(0.5)


def _csv(out: Path) -> str:
    """results.csv without the grid's folder in its run paths."""
    return (out / "results.csv").read_text().replace(str(out), "OUT")
