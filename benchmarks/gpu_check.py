"""The prepared GPU check: every GPU figure the README waits for, in one call of at most
9 minutes of wall time, each section capped so that a slow one cannot eat the rest.

    bash benchmarks/gpu_check.sh               # on the lent GPU (the call is at its top)
    python benchmarks/gpu_check.py --dry-run   # every section on the CPU at tiny size, < 3 min

Sections, in priority order (a section that ends early leaves its time to the next):

``paths``       the CUDA-only tests (``pytest -m cuda``: fused Adam, bf16 + channels-last,
                ``torch.compile``, NCCL in one process, CUDA resume, eval on cuda) and one
                ``mtpsl train`` on cuda with every speed option on.
``throughput``  ``bench_train`` at 288x384: XTC one-label at batch 2 and 32 (batched against
                the per-sample form), full labels at batch 2, SL, JTR, mean-teacher and
                pseudo-label at batch 2; ``bench_eval``; ``bench_weightings``; compiled XTC at
                batch 32 last (compiling takes longest).
``comparison``  SL against XTC (one-label, the paper's batch 2, Adam 1e-4, con_weight 2, FiLM
                lr 1e-3) on the built-in rooms at 96x128, 400 training / 100 evaluation
                images, both runs side by side on the one GPU until the time is up (each
                preempted by SIGTERM, which checkpoints), evaluated every 2 epochs; the curves
                go to ``gpu_compare_sl_xtc.json`` and ``.png``.

The rooms for ``comparison`` are rendered on the CPU while the first sections use the GPU.
Every result is a JSON file under ``--out`` (``benchmarks/results`` on a GPU, a scratch folder
in a dry run, so a dry run never overwrites measured results) stamped with the device name,
the torch version, its command and the date; ``gpu_check_<device>.json`` lists every item with
its status, time and files, rewritten after each section so a cut-off run keeps what it did.

``throughput`` runs its items in one worker process (one CUDA start-up), each under its own
alarm; the parent kills a worker, a test run or a training run that overruns its section.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts, imported where they are used

BUDGET_S = {"gpu": 540, "dry": 170}
"""Wall time of the whole check: 9 minutes on the GPU, under 3 in the dry run."""
SECTION_CAPS_S = {"gpu": {"paths": 170, "throughput": 230}, "dry": {"paths": 60, "throughput": 90}}
WORKER_START_S = 15
"""Of the throughput section's cap, kept for its worker's imports and CUDA start-up."""
MARGIN_S = 20
"""Kept back at the end: the comparison's runs stop, checkpoint and are summarised in it."""


@dataclass
class Sizes:
    """What each section measures at: the real sizes, or tiny ones for the dry run."""

    device: str
    height: int = 288
    width: int = 384
    width_mult: float = 1.0
    big_batch: int = 32
    steps: int = 30
    warmup: int = 10
    compile_big: bool = True
    weightings: str | None = None  # every registered strategy
    on_representation: str | None = None  # bench_weightings' default set
    on_gramian: str | None = None  # bench_weightings' default set
    rooms: tuple[int, int, int, int] = (400, 100, 96, 128)  # train, eval, height, width
    eval_every: int = 2
    speed_train: tuple[str, ...] = ("train.compile=true", "train.fused_optimizer=true")

    @classmethod
    def of(cls, dry_run: bool) -> Sizes:
        return cls.dry() if dry_run else cls(device="cuda")

    @classmethod
    def dry(cls) -> Sizes:
        return cls(device="cpu", height=32, width=48, width_mult=0.0625, big_batch=4, steps=1,
                   warmup=1, compile_big=False, weightings="uniform,pcgrad",
                   on_representation="mgda", on_gramian="mgda",
                   rooms=(8, 4, 32, 48), eval_every=1, speed_train=())


@dataclass
class Item:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------- the parent: sections


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    mode = "dry" if args.dry_run else "gpu"
    sizes = Sizes.of(args.dry_run)
    if not args.dry_run and not _cuda_available():
        print("error: no CUDA device; `--dry-run` checks the script on the CPU", file=sys.stderr)
        return 2
    out = Path(args.out or (ROOT / "benchmarks" / "results" if mode == "gpu" else
                            Path(tempfile.gettempdir()) / "mtpsl-gpu-check-dry"))
    work = Path(args.work or tempfile.mkdtemp(prefix="mtpsl-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/gpu_check.py",
                          *(sys.argv[1:] if argv is None else argv)])
    return Check(args, mode, sizes, out, work, command).run()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, under 3 minutes")
    p.add_argument("--out", help="results folder (default benchmarks/results on a GPU)")
    p.add_argument("--work", help="scratch folder for data and runs (default: a temp folder)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (540; dry 170)")
    p.add_argument("--slack", type=float, default=1.0,
                   help="multiply the budget and every cap (a dry run on a loaded machine)")
    p.add_argument("--compare-seconds", type=float,
                   help="cap the comparison's training time (default: all that is left)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a section's items, in this process
    p.add_argument("--report", help=argparse.SUPPRESS)  # where a worker writes its items
    return p.parse_args(argv)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class Check:
    """The sections of one check, their clock and the manifest."""

    def __init__(self, args, mode: str, sizes: Sizes, out: Path, work: Path, command: str):
        self.args, self.mode, self.sizes, self.out, self.work = args, mode, sizes, out, work
        self.command = command
        self.started = time.monotonic()
        self.deadline = self.started + (args.budget or BUDGET_S[mode] * args.slack)
        self.sections: dict[str, dict] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}

    @functools.cached_property
    def device(self) -> str:
        """The device's name, as every record states it."""
        return device_name(self.sizes.device)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self) -> int:
        rooms = self._render_rooms()  # on the CPU, while the GPU sections run
        caps = {k: v * self.args.slack for k, v in SECTION_CAPS_S[self.mode].items()}
        self.section("paths", caps["paths"], self.paths)
        self.section("throughput", caps["throughput"], self.throughput)
        self.section("comparison", self.left() - MARGIN_S, lambda cap: self.comparison(rooms, cap))
        failed = [f"{s}/{i['name']}" for s, sec in self.sections.items() for i in sec["items"]
                  if i["status"] != "ok"]
        print(f"gpu check: {time.monotonic() - self.started:.0f} s; "
              + (f"not ok: {', '.join(failed)}" if failed else "every item ok"))
        return 1 if failed else 0

    def section(self, name: str, cap: float, body: Callable[[float], list[Item]]) -> None:
        cap = max(0.0, min(cap, self.left() - MARGIN_S))
        print(f"== {name} (cap {cap:.0f} s)", flush=True)
        start = time.monotonic()
        items = body(cap) if cap > 0 else [Item(name, "skipped", note="no time left")]
        self.sections[name] = {"cap_s": round(cap), "seconds": round(time.monotonic() - start, 1),
                               "items": [asdict(i) for i in items]}
        self._write_manifest()

    def _write_manifest(self) -> None:
        import torch

        record = {"benchmark": "gpu_check", "mode": self.mode, "date": _now(),
                  "device": self.device, "torch": torch.__version__,
                  "command": self.command, "budget_s": round(self.deadline - self.started),
                  "sections": self.sections}
        tag = "dry_run" if self.mode == "dry" else "cuda"
        (self.out / f"gpu_check_{tag}.json").write_text(json.dumps(record, indent=2) + "\n")

    # -- paths

    def paths(self, cap: float) -> list[Item]:
        end = time.monotonic() + cap
        tests = Item("cuda_tests")
        junit = self.work / "cuda_tests.xml"
        files = sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.cuda" in p.read_text())  # collecting them all takes ~10 s
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
               f"--junitxml={junit}", f"--basetemp={self.work / 'pytest'}", "-o", "addopts=",
               *files]
        with timed(tests):
            done = self._subprocess(tests, cmd, min(cap * 0.65, end - time.monotonic()))
            if done is not None:
                counts = junit_counts(junit)
                tests.status = "ok" if done == 0 and counts["tests"] > 0 else "failed"
                tests.note = ", ".join(f"{k} {v}" for k, v in counts.items())
                tests.files = [self._result("gpu_cuda_tests.json", cmd, counts)]
        train = Item("train_every_speed_option")
        with timed(train):
            train.files = self._speed_train(train, end)
        return [tests, train]

    def _speed_train(self, item: Item, end: float) -> list[str]:
        data, run = self.work / "speed-data", self.work / "speed-run"
        h, w = (96, 128) if self.mode == "gpu" else (32, 48)
        render = self._synth(data, 16, 8, h, w)
        if self._subprocess(item, render, end - time.monotonic()) != 0:
            return []
        train = [*self._mtpsl("train"), "--config", "synthetic_demo", "--run-dir", str(run),
                 f"dataset.root={data}", "method.name=xtc", "train.epochs=2",
                 f"train.device={self.sizes.device}", "train.amp=bf16",
                 "train.channels_last=true", "train.num_workers=2", "train.deterministic=false",
                 "train.progress=false", *self.sizes.speed_train]
        if self.mode == "dry":
            train += ["model.width=0.0625", "train.batch_size=4"]
        if self._subprocess(item, train, end - time.monotonic()) != 0:
            return []
        final = json.loads((run / "final_metrics.json").read_text())
        item.status = "ok"
        return [self._result("gpu_train_speed_options.json", train, final)]

    # -- throughput

    def throughput(self, cap: float) -> list[Item]:
        report = self.work / "throughput.json"
        # the worker's clock starts after its imports and CUDA start-up: leave them time
        cmd = [sys.executable, str(HERE / "gpu_check.py"), *args_list(self.args),
               "--worker", "throughput", "--report", str(report), "--out", str(self.out),
               "--budget", str(cap - WORKER_START_S)]
        holder = Item("throughput_worker")
        code = self._subprocess(holder, cmd, cap)
        items = [Item(**i) for i in json.loads(report.read_text())] if report.exists() else []
        if code != 0 or not items:
            items.append(holder if holder.status != "not run" else
                         Item("throughput_worker", "failed", note=f"exit {code}"))
        return items

    # -- comparison

    def _render_rooms(self) -> subprocess.Popen:
        return self._launch(self._synth(self.work / "rooms", *self.sizes.rooms),
                            self.work / "rooms.log")

    def comparison(self, rooms: subprocess.Popen, cap: float) -> list[Item]:
        item = Item("sl_vs_xtc_onelabel")
        with timed(item):
            end = time.monotonic() + min(cap, self.args.compare_seconds or cap)
            try:
                rendered = rooms.wait(timeout=max(1.0, end - time.monotonic())) == 0
            except subprocess.TimeoutExpired:
                rooms.kill()
                rendered = False
            if not rendered:
                item.status, item.note = "failed", (self.work / "rooms.log").read_text()[-2000:]
                return [item]
            runs = {m: self.work / f"compare-{m}" for m in ("sl", "xtc")}
            commands = {m: self._compare_args(m, run) for m, run in runs.items()}
            procs = {m: self._launch(cmd, self.work / f"compare-{m}.log")
                     for m, cmd in commands.items()}
            stopped = stop_at(procs, end)
            curves = {m: eval_curve(run) for m, run in runs.items()}
            item.note = ", ".join(f"{m}: {len(c)} evaluations, {stopped[m]}"
                                  for m, c in curves.items())
            item.status = "ok" if all(curves.values()) else "failed"
            item.files = self._write_curves(curves, commands)
        return [item]

    def _compare_args(self, method: str, run: Path) -> list[str]:
        xtc = ["method.options.con_weight=2", "method.options.film_lr=1e-3"]
        cmd = [*self._mtpsl("train"), "--config", "nyuv2_onelabel", "--run-dir", str(run),
               f"dataset.root={self.work / 'rooms'}", f"method.name={method}",
               *(xtc if method == "xtc" else []), "optim.lr=1e-4", "train.batch_size=2",
               "train.epochs=200", f"train.eval_every={self.sizes.eval_every}",
               f"train.checkpoint_every={self.sizes.eval_every}",
               f"train.device={self.sizes.device}",
               # the dry run's CPU may only emulate bf16 (several times slower than fp32)
               f"train.amp={'auto' if self.mode == 'dry' else 'bf16'}",
               "train.channels_last=true", "train.deterministic=false", "train.num_workers=2",
               "train.progress=false"]
        if self.mode == "dry":
            cmd.append("model.width=0.0625")
        return cmd

    def _launch(self, cmd: list[str], log_path: Path) -> subprocess.Popen:
        """Start ``cmd`` in the background, its output to ``log_path``."""
        log = log_path.open("w")
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=log)

    def _write_curves(self, curves: dict[str, list[dict]],
                      commands: dict[str, list[str]]) -> list[str]:
        n_train, n_val, h, w = self.sizes.rooms
        path = self._result("gpu_compare_sl_xtc.json", [], {
            "setup": {"data": f"built-in rooms {n_train} train / {n_val} eval at {h}x{w}",
                      "labels": "onelabel", "batch_size": 2, "optimiser": "Adam 1e-4",
                      "xtc": "con_weight 2, FiLM lr 1e-3",
                      "amp": "bf16" if self.mode == "gpu" else "auto",
                      "stopped_by": "SIGTERM when the section's time was up"},
            "commands": {m: shown(c) for m, c in commands.items()}, "curves": curves})
        figure = plot_curves(curves, self.out / "gpu_compare_sl_xtc.png")
        return [path, *([figure] if figure else [])]

    # -- helpers

    def _mtpsl(self, *command: str) -> list[str]:
        return [sys.executable, "-m", "mtpsl", *command]

    def _synth(self, out: Path, n_train: int, n_val: int, height: int, width: int) -> list[str]:
        """``mtpsl data synth``: the built-in rooms in the NYUv2 layout."""
        return [*self._mtpsl("data", "synth"), "--out", str(out), "--n-train", str(n_train),
                "--n-val", str(n_val), "--height", str(height), "--width", str(width)]

    def _subprocess(self, item: Item, cmd: list[str], cap: float) -> int | None:
        """Run ``cmd`` for at most ``cap`` seconds; its return code, or None on a timeout."""
        if cap <= 1:
            item.status, item.note = "skipped", "no time left"
            return None
        try:
            done = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=cap)
        except subprocess.TimeoutExpired:
            item.status, item.note = "timeout", f"over {cap:.0f} s: {shown(cmd)[:300]}"
            return None
        if done.returncode != 0:
            item.status = "failed"
            item.note = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
        return done.returncode

    def _result(self, name: str, cmd: list[str], body: dict) -> str:
        import torch

        path = self.out / name
        record = {"device": self.device, "torch": torch.__version__,
                  "command": shown(cmd) if cmd else self.command, "date": _now(), **body}
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return path.name


def shown(cmd: list[str]) -> str:
    """A command as it would be typed in the repository: ``python`` for this interpreter."""
    return shlex.join(["python" if c == sys.executable else c for c in cmd])


def args_list(args: argparse.Namespace) -> list[str]:
    """The options a worker inherits (its section, report and budget are set by the parent)."""
    return [*(["--dry-run"] if args.dry_run else []), *(["--work", args.work] if args.work else []),
            f"--slack={args.slack}"]


def stop_at(procs: dict[str, subprocess.Popen], end: float) -> dict[str, str]:
    """Wait for the runs until ``end``, then SIGTERM them (they checkpoint and exit 75)."""
    for proc in procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.0, end - time.monotonic()))
    how = {}
    for method, proc in procs.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            how[method] = "preempted at the deadline"
        else:
            how[method] = f"finished (exit {proc.returncode})"
    for method, proc in procs.items():
        try:
            code = proc.wait(timeout=MARGIN_S * 0.75)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            how[method] += ", killed"
        if how[method].startswith("preempted") and code not in (75, 0):
            how[method] += f" (exit {code})"
    return how


def eval_curve(run: Path) -> list[dict]:
    """The evaluated epochs of a run's ``metrics.jsonl``: epoch, seconds so far, eval metrics."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"epoch": r["epoch"], **{k: v for k, v in r.items() if k.startswith("eval/")}}
            for r in rows if any(k.startswith("eval/") for k in r)]


CURVE_KEYS = ("eval/semantic/miou", "eval/depth/abs_err", "eval/normal/mean")
"""The metrics the figure plots (the JSON keeps every one)."""


def plot_curves(curves: dict[str, list[dict]], path: Path) -> str | None:
    keys = [k for k in CURVE_KEYS if any(k in r for rows in curves.values() for r in rows)]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for method, rows in curves.items():
            ax.plot([r["epoch"] for r in rows], [r.get(key) for r in rows], marker="o",
                    label=method)
        ax.set_title(key.removeprefix("eval/"))
        ax.set_xlabel("epoch")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {"tests": 0}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's with its thread count (as every benchmark records it)."""
    import torch
    from bench_train import device_name as named

    return named(torch.device(device))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@contextlib.contextmanager
def timed(item: Item) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        item.seconds = round(time.monotonic() - start, 1)


# ---------------------------------------------------------------- the worker: benchmarks


class ItemTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in this (main) thread after ``seconds``."""

    def fire(signum, frame):
        raise ItemTimeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_items(items: list[tuple[str, float, Callable[[], list[str]]]], budget: float,
              report: Path | None = None) -> list[Item]:
    """Run each ``(name, cap, body)`` under an alarm of ``min(cap, what is left)``; a body
    that raises or overruns is recorded and the next one runs. The report is rewritten after
    each item so that a killed worker leaves the finished ones behind."""
    end = time.monotonic() + budget
    done: list[Item] = []
    for name, cap, body in items:
        item = Item(name)
        left = end - time.monotonic()
        if left <= 1:
            item.status, item.note = "skipped", "no time left in the section"
        else:
            with timed(item):
                try:
                    with alarm(min(cap, left)):
                        item.files = body()
                    item.status = "ok"
                except ItemTimeout:
                    item.status, item.note = "timeout", f"over {min(cap, left):.0f} s"
                except Exception as err:  # one item's failure must not stop the others
                    item.status, item.note = "failed", f"{type(err).__name__}: {err}"[:1500]
        done.append(item)
        print(f"  {name}: {item.status} {item.seconds:.0f} s {item.note[:200]}", flush=True)
        if report:
            report.write_text(json.dumps([asdict(i) for i in done], indent=2) + "\n")
    return done


def run_worker(args: argparse.Namespace) -> int:
    sizes = Sizes.of(args.dry_run)
    out = Path(args.out)
    items = [(name, cap * args.slack, body) for name, cap, body in throughput_items(sizes, out)]
    run_items(items, args.budget, Path(args.report))
    return 0


def throughput_items(sizes: Sizes, out: Path) -> list[tuple[str, float, Callable[[], list[str]]]]:
    """``bench_train`` / ``bench_eval`` / ``bench_weightings`` calls in the issue's order."""
    import bench_eval
    import bench_train
    import bench_weightings

    size = ["--device", sizes.device, "--height", str(sizes.height), "--width", str(sizes.width),
            "--width-mult", str(sizes.width_mult)]
    fast = ["--amp", "bf16", "--channels-last", "--steps", str(sizes.steps),
            "--warmup", str(sizes.warmup)]

    def train(name: str, *extra: str) -> Callable[[], list[str]]:
        def body() -> list[str]:
            path = out / f"bench_train_{_tag(sizes)}_{name}.json"
            bench_train.main([*size, *fast, *extra, "--out", str(path)])
            return [stamp(path)]
        return body

    def evaluation() -> list[str]:
        path = out / f"bench_eval_{_tag(sizes)}.json"
        bench_eval.main(["--device", sizes.device, "--height", str(sizes.height),
                         "--width", str(sizes.width), "--batch-size", str(sizes.big_batch // 2),
                         "--batches", str(max(2, sizes.steps // 3)), "--repeats", "2",
                         "--out", str(path)])
        return [stamp(path)]

    def weightings() -> list[str]:
        path = out / f"weightings_{_tag(sizes)}.json"
        bench_weightings.main([*size, "--batch-size", "2", "--steps", str(max(1, sizes.steps // 3)),
                               "--warmup", str(max(1, sizes.warmup // 3)), "--out", str(path),
                               *(["--only", sizes.weightings] if sizes.weightings else []),
                               *(["--representation", sizes.on_representation]
                                 if sizes.on_representation is not None else []),
                               *(["--gramian", sizes.on_gramian]
                                 if sizes.on_gramian is not None else [])])
        return [stamp(path)]

    big = str(sizes.big_batch)
    compiled = ["--compile"] if sizes.compile_big else []
    # compiling takes the longest and goes last, so that it cannot crowd out the others
    return [
        ("xtc_onelabel_b2", 45, train("onelabel_b2", "--batch-size", "2")),
        ("xtc_onelabel_b32", 50, train(f"onelabel_b{big}", "--batch-size", big)),
        ("xtc_full_b2", 30, train("full_b2", "--batch-size", "2", "--regime", "full")),
        *[(f"{m}_onelabel_b2", 20, train(f"{m}_onelabel_b2", "--method", m, "--batch-size", "2"))
          for m in ("sl", "jtr", "mean_teacher", "pseudo_label")],
        ("eval", 30, evaluation),
        ("weightings", 80, weightings),
        ("xtc_onelabel_b32_compiled", 100, train(f"onelabel_b{big}_compile", "--batch-size", big,
                                                 "--skip-per-sample", *compiled)),
    ]


def _tag(sizes: Sizes) -> str:
    return "cuda" if sizes.device.startswith("cuda") else "cpu_dry_run"


def stamp(path: Path) -> str:
    """Add the date (and the torch version and device if missing) to a benchmark's JSON."""
    import torch

    record = json.loads(path.read_text())
    record.setdefault("torch", torch.__version__)
    record["date"] = _now()
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path.name


if __name__ == "__main__":
    sys.exit(main())
