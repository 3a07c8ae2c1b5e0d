"""Speed options of the training step: autocast, channels_last, torch.compile, fused optimisers,
threads and loader workers, with ``auto`` resolved from what the hardware does natively.

Mixed precision keeps every loss, normalisation and metric in fp32: the model's task
activations (log-softmax, L2 normalisation of normals) are run in fp32 outside autocast, and
its outputs are cast to fp32 before a method sees them, so only convolutions and matmuls
(the model's and the method's networks) run in bf16/fp16.

Why the ``auto`` rules (:func:`resolve_speed`) are what they are, measured on 2-core AMD
EPYC machines, one SL epoch of the demo preset (160 images at 64x96, quarter-width SegNet):

======================================  ===========  ===========  ===========  ===========
CPU (torch 2.14)                        fp32 NCHW    fp32 NHWC    bf16 NCHW    bf16 NHWC
======================================  ===========  ===========  ===========  ===========
Zen 3, AVX2, no native bf16 (issue 27)  9.4 s        8.6 s        65.0 s       32.5 s
Zen 4, AVX512 + avx512_bf16             2.9 s        2.6 s        1.6 s        1.4 s
======================================  ===========  ===========  ===========  ===========

(Zen 3: the whole process; Zen 4: one epoch's training and evaluation, the whole process less
the start-up, from 1- and 2-epoch runs.) bf16 without bf16 instructions is emulated by oneDNN
(converted to fp32 and back around every kernel): 3.8x slower than fp32 there, so ``auto``
takes bf16 only where it is native. NHWC (channels_last) was faster in all four columns, most
with bf16, so ``auto`` takes it on every CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mtpsl.core.config import Config, TrainConfig
from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import ConfigError
from mtpsl.models import ModelOutput, MultiTaskModel
from mtpsl.weighting import WEIGHTINGS, Weighting

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND = "inductor"
"""torch.compile backend of ``train.compile`` (tests use "eager": tracing without codegen)."""


# -- what the hardware computes natively -------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """What the ``auto`` rules read about a device."""

    kind: str
    """The device type: cpu, cuda, mps..."""
    name: str
    """CPU model or GPU name."""
    native_bf16: bool
    """bf16 convolutions and matmuls run on bf16 units (not converted to fp32 and back)."""
    native_fp16: bool
    isa: str
    """What the probe read: the CPU's vector capability and bf16 flags, or the GPU's compute
    capability."""
    tf32: bool = False
    """CUDA: fp32 convolutions run on TF32 tensor cores (compute capability 8.0+)."""


@functools.lru_cache(maxsize=8)
def probe_hardware(device: torch.device) -> Hardware:
    """The device's native precisions (cached: the answer does not change in a process)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        # bf16 tensor cores from Ampere (8.0); before it torch emulates bf16 in fp32 units
        return Hardware("cuda", torch.cuda.get_device_name(device), major >= 8, major >= 7,
                        f"compute capability {major}.{minor}", tf32=major >= 8)
    if device.type == "cpu":
        return Hardware("cpu", cpu_name(), *cpu_precisions())
    return Hardware(device.type, device.type, False, False, "not probed")


def cpu_precisions() -> tuple[bool, bool, str]:
    """(native bf16, native fp16, what was read) for this CPU.

    oneDNN's own check (``_is_mkldnn_bf16_supported``) is true on any AVX-512 CPU, which it
    then serves with fp32 FMAs and conversions; native means bf16 dot-product instructions
    as well: AVX512-BF16 or AMX-BF16 on x86 (every AMX CPU also has AVX512-BF16), the BF16
    extension on Arm (oneDNN's check there is that flag).
    """
    capability = torch.backends.cpu.get_cpu_capability()
    mkldnn = torch.backends.mkldnn.is_available()
    onednn_bf16 = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    onednn_fp16 = mkldnn and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    if platform.machine().lower() in ("aarch64", "arm64"):
        return onednn_bf16, onednn_fp16, f"{capability}, Arm BF16 {'yes' if onednn_bf16 else 'no'}"
    flags = [f for f in ("avx512_bf16", "amx_bf16") if _cpu_has(f)]
    return (onednn_bf16 and bool(flags), onednn_fp16,
            f"{capability}, {' + '.join(flags) if flags else 'no avx512_bf16 or amx_bf16'}")


_TORCH_CPU_PROBES = {"avx512_bf16": "_is_avx512_bf16_supported",
                     "amx_bf16": "_is_amx_tile_supported"}


def _cpu_has(flag: str) -> bool:
    """A CPU feature from torch's cpuinfo probe, else from /proc/cpuinfo's flags."""
    probe = getattr(torch.cpu, _TORCH_CPU_PROBES[flag], None)
    if probe is not None:
        return bool(probe())
    return flag in proc_cpuinfo().get("flags", "").split()


def proc_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_name() -> str:
    return proc_cpuinfo().get("model name") or platform.processor() or platform.machine()


def usable_cpus() -> tuple[int, str]:
    """The cores this process may run on: its affinity, lowered by a cgroup CPU quota (a
    container's limit, which affinity does not show); and where the number came from."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    source = "affinity"
    quota = _cgroup_quota()
    if quota is not None and quota < cores:
        cores, source = quota, "cgroup quota"
    return max(1, cores), source


def _cgroup_quota() -> int | None:
    """The cgroup's CPU limit in cores, rounded up (v2's cpu.max, else v1's CFS quota)."""
    try:
        quota, _, period = _read("/sys/fs/cgroup/cpu.max").partition(" ")
    except OSError:
        try:
            quota = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
            period = _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        except OSError:
            return None
    try:
        return max(1, math.ceil(int(quota) / int(period or 100000))) if int(quota) > 0 else None
    except ValueError:  # "max": no limit
        return None


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def local_processes() -> int:
    """Training processes sharing this node's cores (torchrun's LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


# -- the auto rules ----------------------------------------------------------------------------

def choose_amp(requested: str, hw: Hardware) -> tuple[str, str]:
    """``train.amp`` for ``hw`` and why: ``auto`` is bf16 where it is native, else off."""
    amp = requested
    if requested == "auto":
        amp = "bf16" if hw.kind in ("cpu", "cuda") and hw.native_bf16 else "off"
    return amp, f"{_origin(requested)}: {amp_reason(amp, hw)}"


def amp_reason(amp: str, hw: Hardware) -> str:
    """What ``amp`` is on ``hw``, from the hardware alone: the same words for a run resumed
    on the machine as for one that ran through (their environments compare equal)."""
    if amp == "off":
        if hw.native_bf16:
            return f"fp32, though {hw.name} computes bf16 natively ({hw.isa})"
        return f"fp32: {hw.name} has no native bf16 ({hw.isa})"
    native = {"bf16": hw.native_bf16, "fp16": hw.native_fp16}.get(amp, False)
    if native:
        return f"{hw.name} computes {amp} natively ({hw.isa})"
    return f"{amp} emulated on {hw.name} ({hw.isa}), slower than fp32"


def choose_channels_last(requested: bool | str, amp: str, hw: Hardware) -> tuple[bool, str]:
    """``train.channels_last`` for ``hw`` and why (measurements: the module's docstring):
    ``auto`` is NHWC on the CPU, and on CUDA where tensor cores run the convolutions."""
    value = requested is True
    if requested == "auto":
        value = hw.kind == "cpu" or (hw.kind == "cuda" and (amp != "off" or hw.tf32))
    return value, f"{_origin(requested)}: {layout_reason(value, amp, hw)}"


def layout_reason(channels_last: bool, amp: str, hw: Hardware) -> str:
    """What the memory layout is on ``hw``, from the hardware alone (see :func:`amp_reason`)."""
    layout = "NHWC" if channels_last else "NCHW"
    if hw.kind == "cpu":
        return f"{layout}; NHWC is the faster on the CPU in fp32 and bf16"
    if hw.kind == "cuda":
        if amp != "off" or hw.tf32:
            return f"{layout}; tensor cores take NHWC"
        return f"{layout}; NCHW is fp32's own layout without tensor cores"
    return layout


def _origin(requested: object) -> str:
    return "auto" if requested == "auto" else "set"


def choose_threads(requested: int | str) -> tuple[int, str]:
    """Intra-op threads and why: ``auto`` keeps torch's count (OMP_NUM_THREADS, or what
    was set before) unless it exceeds this process's share of the usable cores."""
    if requested != "auto":
        return int(requested), f"set: {threads_reason(int(requested))}"
    cores, _ = usable_cpus()
    current = torch.get_num_threads()
    threads = min(current, max(1, cores // local_processes()))
    return threads, f"auto: {threads_reason(threads)}"


def threads_reason(threads: int) -> str:
    cores, source = usable_cpus()
    shared = local_processes()
    among = f", shared by {shared} processes" if shared > 1 else ""
    return f"{threads} of {cores} usable cores (by {source}{among})"


def loader_workers(requested: int | str, device: torch.device) -> int:
    """DataLoader workers: ``auto`` = 0 on the CPU (loading a batch of the shipped ``.npy``
    layouts takes milliseconds, and a worker process would compete with the compute threads
    for the same cores), else up to 8 of this process's share of the cores, one left to it."""
    if requested != "auto":
        return int(requested)
    if device.type == "cpu":
        return 0
    return max(0, min(8, usable_cpus()[0] // local_processes() - 1))


@dataclass(frozen=True)
class SpeedChoice:
    """The resolved speed keys of a run, the hardware they were chosen for, and why."""

    amp: str
    channels_last: bool
    threads: int
    num_workers: int
    hardware: Hardware
    reasons: dict[str, str]

    def announce(self, device: torch.device) -> None:
        """Print the choice once per process (stderr) and warn once about a precision this
        hardware emulates."""
        _once(self.line())
        warn_if_emulated(self.amp, self.hardware, device)

    def line(self) -> str:
        """The start-up line: the choices and their reasons."""
        precision = "fp32" if self.amp == "off" else f"{self.amp} autocast"
        return (f"speed: {precision} ({self.reasons['amp']}); channels_last "
                f"{'on' if self.channels_last else 'off'}; {self.threads} threads; "
                f"{self.num_workers} loader workers")


def resolve_speed(config: Config, device: torch.device,
                  env: DistEnv | None = None) -> SpeedChoice:
    """Write the machine's values into ``config.train``'s ``auto`` precision and layout keys
    (so config.yaml, the checkpoint and the set-up record bf16 or off, never "auto"), set
    torch's threads and return the choice; :meth:`SpeedChoice.announce` says it (after the
    set-up is checked, so a config error is the first thing a user reads).

    ``amp`` and ``channels_last`` are written (they define the experiment; a resumed run keeps
    them); ``threads`` and ``num_workers`` stay ``auto`` in the config (not part of the set-up)
    and are chosen again on every start, for the machine it runs on. Under torchrun rank 0's
    precision and layout are taken by every process.
    """
    cfg = config.train
    env = env or DistEnv()
    hw = probe_hardware(device)
    amp, amp_why = choose_amp(cfg.amp, hw)
    if cfg.amp == "auto" and config.method.weighting_gradients == "gramian":
        amp, amp_why = "off", f"auto: fp32: {GRAMIAN_FP32}"
    channels_last, layout_why = choose_channels_last(cfg.channels_last, amp, hw)
    if env.enabled:  # one precision for all: a mixed-precision average is nobody's model
        box: list = [(amp, amp_why, channels_last, layout_why)]
        torch.distributed.broadcast_object_list(box, src=0)
        amp, amp_why, channels_last, layout_why = box[0]
    threads, threads_why = choose_threads(cfg.threads)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    workers = loader_workers(cfg.num_workers, device)
    workers_why = f"{_origin(cfg.num_workers)}: {workers} on {device.type}"
    if cfg.amp != amp:
        cfg.amp = amp  # type: ignore[assignment]  # validated Literal
    if cfg.channels_last != channels_last:
        cfg.channels_last = channels_last
    reasons = {"amp": amp_why, "channels_last": layout_why, "threads": threads_why,
               "num_workers": workers_why}
    return SpeedChoice(amp, channels_last, threads, workers, hw, reasons)


_SAID: set[str] = set()
"""Lines already printed by this process (a compare grid resolves every cell alike)."""


def _once(line: str) -> bool:
    if line in _SAID:
        return False
    _SAID.add(line)
    print(line, file=sys.stderr, flush=True)
    return True


def warn_if_emulated(amp: str, hw: Hardware, device: torch.device) -> None:
    """Warn once per process when ``amp`` is a precision ``hw`` only emulates (an explicit
    ``train.amp=bf16``, or a run resumed on other hardware than it started on), with the
    cost measured here: one convolution in both precisions."""
    native = {"bf16": hw.native_bf16, "fp16": hw.native_fp16}.get(amp, True)
    key = f"emulated {amp} on {hw.name}"
    if native or hw.kind not in ("cpu", "cuda") or key in _SAID:
        return
    fp32, low = conv_seconds(device, None), conv_seconds(device, AMP_DTYPES[amp])
    _SAID.add(key)
    print(f"warning: train.amp={amp} on {hw.name} ({hw.isa}): this {hw.kind} has no native "
          f"{amp} and emulates it; one 3x3 convolution (32 channels, 8x64x96) took "
          f"{low * 1e3:.1f} ms in {amp} against {fp32 * 1e3:.1f} ms in fp32 here "
          f"({low / fp32:.1f}x); train.amp=auto picks fp32 on this machine",
          file=sys.stderr, flush=True)


def conv_seconds(device: torch.device, dtype: torch.dtype | None, repeats: int = 3) -> float:
    """Best-of-``repeats`` time of one NHWC 3x3 convolution forward under autocast to
    ``dtype`` (None: fp32): the emulation warning's measured cost (about 0.1 s in all)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(device).to(memory_format=torch.channels_last)
    x = torch.rand(8, 32, 64, 96, generator=g).to(device, memory_format=torch.channels_last)
    ctx = (contextlib.nullcontext() if dtype is None
           else torch.autocast(device.type, dtype=dtype))
    best = math.inf
    with torch.no_grad(), ctx:
        for k in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            conv(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:  # the first call creates the kernel
                best = min(best, time.perf_counter() - start)
    return best


def speed_environment(cfg: TrainConfig, device: torch.device) -> dict:
    """The run's speed keys as resolved, what each is on this hardware, and the facts they
    were chosen from (``final_metrics.json``'s environment)."""
    hw = probe_hardware(device)
    amp = str(cfg.amp)
    return {
        "amp": cfg.amp, "amp_reason": amp_reason(amp, hw),
        "channels_last": cfg.channels_last,
        "channels_last_reason": layout_reason(cfg.channels_last is True, amp, hw),
        "threads": torch.get_num_threads(),
        "threads_reason": threads_reason(torch.get_num_threads()),
        "num_workers": loader_workers(cfg.num_workers, device),
        "native_bf16": hw.native_bf16, "isa": hw.isa,
    }


# -- options that must fit together --------------------------------------------------------------

def linear_weightings() -> list[str]:
    """Registered weightings whose gradient is linear in the task losses within a step, so
    scaling the losses by the fp16 loss scale scales the gradient alike (GradScaler's
    contract): each declares ``linear_in_losses``."""
    return [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).linear_in_losses]


def accumulable_weightings() -> list[str]:
    """Linear weightings that draw nothing per step: k summed micro-batches equal one step on
    k times the batch."""
    return [n for n in linear_weightings() if not WEIGHTINGS.get(n).draws_per_step]


GRAMIAN_FP32 = ("the Gram engine of method.weighting_gradients=gramian (torchjd's autogram) "
                "does not run under autocast")


def check_options(config: Config, device: torch.device, weighting: Weighting) -> None:
    """Reject combinations that cannot work, naming the config keys (``weighting`` is the
    configured strategy, built). ``auto`` keys still unresolved (a set-up that did not start
    through :func:`mtpsl.engine.run.train`: benchmarks, tests) are resolved first, quietly."""
    if "auto" in (config.train.amp, config.train.channels_last):
        resolve_speed(config, device)
    cfg, name = config.train, config.method.weighting
    if cfg.amp == "fp16" and not weighting.linear_in_losses:
        raise ConfigError(
            f"train.amp: fp16 needs a loss scale, which is exact only for weightings linear "
            f"in the losses ({', '.join(linear_weightings())}); method.weighting is "
            f"{name!r}: use train.amp=bf16 or off"
        )
    if cfg.amp != "off" and weighting.gradients == "gramian":
        raise ConfigError(f"train.amp: {cfg.amp}: {GRAMIAN_FP32}; use train.amp=off (or auto), "
                          f"or method.weighting_gradients=parameters")
    if cfg.accumulate > 1 and (not weighting.linear_in_losses or weighting.draws_per_step):
        raise ConfigError(
            f"train.accumulate: summing micro-batch gradients equals a larger batch only for "
            f"weightings linear in the losses with fixed weights within a step "
            f"({', '.join(accumulable_weightings())}); method.weighting is {name!r}: use "
            f"a larger train.batch_size instead"
        )
    if cfg.amp != "off" and not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ConfigError(f"train.amp: autocast is not available on device {device.type!r}")


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``train.amp`` (a no-op for ``off``; ``auto`` as
    :func:`choose_amp` resolves it on ``device``)."""
    if amp == "auto":
        amp = choose_amp(amp, probe_hardware(device))[0]
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _fp32(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def activation(raw: Tensor) -> Tensor:
        with torch.autocast(raw.device.type, enabled=False):
            return fn(raw.float())

    return activation


def fp32_activations(model: nn.Module) -> int:
    """Run every task activation of ``model`` in fp32; returns how many were wrapped.

    Models keep their heads' activations in an ``activations`` dict (the model contract,
    :class:`~mtpsl.models.MultiTaskModel`); containers such as STL's leave it to members.
    """
    wrapped = 0
    for module in model.modules():
        table = vars(module).get("activations") if isinstance(module, MultiTaskModel) else None
        if isinstance(table, dict):
            for name, fn in table.items():
                if not getattr(fn, "_mtpsl_fp32", False):
                    table[name] = _fp32(fn)
                    table[name]._mtpsl_fp32 = True
                    wrapped += 1
    return wrapped


def _outputs_to_fp32(module: nn.Module, args: tuple, output: ModelOutput) -> ModelOutput:
    return ModelOutput(_float(output.preds), _float(output.features))


def _float(maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in maps.items()}


def prepare_model(model: nn.Module, cfg: TrainConfig) -> None:
    """Apply ``train.amp`` / ``channels_last`` / ``compile`` to ``model`` in place."""
    if cfg.amp != "off":
        fp32_activations(model)
        model.register_forward_hook(_outputs_to_fp32)
    if cfg.channels_last is True:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:  # inductor's own determinism flag, left unset at start (see experiment)
        torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                           warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
        model.compile(backend=COMPILE_BACKEND)


def prepare_for_evaluation(model: nn.Module, cfg: TrainConfig) -> None:
    """A loaded run's model set up as its training evaluated it (fp32 activations under the
    run's autocast, its memory layout; not compiled), so ``mtpsl eval`` reproduces the
    metrics the run reported."""
    prepare_model(model, cfg.model_copy(update={"compile": False}))


NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
"""torch's normalisation layers; a layer of ours declares ``is_normalisation = True``."""


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def fp32_norms(module: nn.Module) -> int:
    """Feed every normalisation layer of ``module`` fp32 inputs; returns how many.

    Under autocast a convolution hands its norm a bf16/fp16 map; per-sample statistics of
    small maps (XTC's mapping net ends at 1/32 resolution) and the cosine losses downstream
    lose most of their precision that way (gradients off by tens of percent on CPU, where
    autocast runs normalisations and cosine similarity in bf16). With fp32 inputs the norm,
    the FiLM/ReLU after it and the network's output stay fp32; only convolutions run in bf16.
    """
    layers = [m for m in module.modules()
              if isinstance(m, NORMS) or getattr(type(m), "is_normalisation", False)]
    for m in layers:
        m.register_forward_pre_hook(_inputs_to_fp32)
    return len(layers)


def prepare_aux(modules: Sequence[nn.Module], cfg: TrainConfig) -> None:
    """The method's own networks (mapping net, discriminators): fp32 norms under autocast,
    channels_last memory."""
    for m in modules:
        if cfg.amp != "off":
            fp32_norms(m)
        if cfg.channels_last is True:
            m.to(memory_format=torch.channels_last)


def to_channels_last(batch, enabled: bool | str):
    """The batch with its images in NHWC memory (labels are left alone); ``enabled`` is the
    resolved ``train.channels_last`` (an unresolved "auto" leaves the batch alone)."""
    if enabled is not True:
        return batch
    for view in batch.views:
        view.image = view.image.contiguous(memory_format=torch.channels_last)
    return batch


def optimizer_extra(cfg: TrainConfig, device: torch.device) -> dict:
    """Keyword arguments for Adam/SGD: fused kernels on CUDA (one launch per step)."""
    if cfg.fused_optimizer and device.type == "cuda":
        return {"fused": True}
    return {}


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
