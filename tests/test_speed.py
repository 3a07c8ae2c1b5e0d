"""Speed options: mixed precision, channels_last, compile, fused optimisers, XTC's two forms.

XTC's consistency is a deep stack of convolutions, per-sample normalisations, ReLUs and max
pools; its gradient is piecewise and reacts strongly to input rounding (rounding only the
predictions to bf16 and computing the rest in fp32 already turns the gradient by ~20 degrees
on the tiny test model). So under bf16 the loss *values* are held to the fp32 per-sample
oracle (relative 2e-2: 8 mantissa bits, ~17 layers), and the gradients in direction only
(cosine >= 0.5; observed ~0.75; an unrelated gradient gives ~0). fp32 with channels_last is
held to the oracle as tightly as the plain batched form (tests/test_xtc.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mtpsl.cli import main
from mtpsl.core.config import OptimConfig, TrainConfig
from mtpsl.core.distributed import DistEnv
from mtpsl.core.errors import ConfigError
from mtpsl.core.param_groups import OptimGroup
from mtpsl.data import DATASETS
from mtpsl.engine import speed
from mtpsl.engine.checkpoint import load_checkpoint
from mtpsl.engine.optim import Optimisation
from mtpsl.methods.joint_space import JointSpaceMapper
from mtpsl.methods.xtc import XTCLoss
from mtpsl.models import HeadSpec, build_model
from mtpsl.tasks import SegmentationTask

from conftest import make_layout

TINY_AUTO = [
    "model.width=0.0625",
    "train.epochs=1",
    "train.batch_size=2",
    "train.progress=false",
    "train.max_steps_per_epoch=2",
    "train.eval_batch_size=4",
]
TINY = [*TINY_AUTO, "train.amp=off", "train.channels_last=false"]
"""fp32 NCHW on every CI machine (``auto`` is bf16 only where the CPU has it natively)."""
LABELLED = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("speed"), n=6, h=32, w=48)


def _soft(task, x):
    # Deterministic stand-in for the Gumbel sample, so both forms see identical inputs.
    return x.exp() if isinstance(task, SegmentationTask) else task.encode_pred(x)


def _xtc_setup(tmp_path, device: str):
    ds = DATASETS.get("nyuv2")(make_layout(tmp_path, n=5, h=64, w=96), "train")
    torch.manual_seed(0)
    heads = {n: HeadSpec.of(t) for n, t in ds.tasks.items()}
    model = build_model("segnet", heads, width=0.0625).to(device)
    image = torch.stack([ds[i]["image"] for i in range(5)]).to(device)
    targets = {n: torch.stack([ds[i][n] for i in range(5)]).to(device) for n in ds.tasks}
    with torch.no_grad():
        out = model(image)
    mapper = JointSpaceMapper(
        {n: t.out_channels for n, t in ds.tasks.items()}, filters=model.filters
    ).to(device)
    with torch.no_grad():  # a non-trivial FiLM, so a wrong pair index would show
        for p in mapper.film_parameters():
            p.add_(0.3 * torch.randn_like(p))
    preds = {k: v.detach().requires_grad_(True) for k, v in out.preds.items()}
    return XTCLoss(ds.tasks, mapper, 0.5), preds, targets, out.features["encoder"]


def _nhwc(maps: dict) -> dict:
    return {
        k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
        for k, v in maps.items()
    }


def _check_fast_against_oracle(tmp_path, device: str, amp: str) -> None:
    loss, preds, targets, feature = _xtc_setup(tmp_path, device)
    oracle = loss.reference_consistency(preds, targets, feature, LABELLED.to(device), _soft)
    g_oracle = torch.autograd.grad(oracle.mean(), list(preds.values()))
    cfg = TrainConfig(amp=amp, channels_last=True)
    speed.prepare_aux([loss], cfg)  # fp32 norms under autocast + NHWC weights
    with speed.autocast(amp, torch.device(device)):
        fast = loss.consistency(
            _nhwc(preds),
            _nhwc(targets),
            feature.contiguous(memory_format=torch.channels_last),
            LABELLED.to(device),
            _soft,
        )
    g_fast = torch.autograd.grad(fast.mean(), list(preds.values()))
    assert fast.dtype == torch.float32 and fast[4] == 0
    a = torch.cat([g.flatten() for g in g_fast])
    b = torch.cat([g.flatten() for g in g_oracle])
    if amp == "off":
        torch.testing.assert_close(fast, oracle, rtol=1e-5, atol=1e-5)
        assert (a - b).norm() <= 2e-2 * b.norm()
    else:
        torch.testing.assert_close(fast, oracle, rtol=2e-2, atol=1e-3)
        assert F.cosine_similarity(a, b, dim=0) >= 0.5


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_batched_xtc_with_cpu_speed_options_matches_fp32_oracle(tmp_path, amp):
    _check_fast_against_oracle(tmp_path, "cpu", amp)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_batched_xtc_with_gpu_speed_options_matches_fp32_oracle(tmp_path, amp):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _check_fast_against_oracle(tmp_path, "cuda", amp)


def test_prepared_model_runs_convs_in_bf16_but_returns_fp32(tmp_path):
    torch.manual_seed(0)
    heads = {"normal": HeadSpec(3, lambda x: F.normalize(x, dim=1))}
    model = build_model("segnet", heads, width=0.0625)
    speed.prepare_model(model, TrainConfig(amp="bf16", channels_last=True))
    seen = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with speed.autocast("bf16", torch.device("cpu")):
        out = model(x)
    assert seen == [torch.bfloat16]
    assert all(v.dtype == torch.float32 for v in [*out.preds.values(), *out.features.values()])
    # the activation ran in fp32: unit vectors to fp32 precision, not bf16's ~4e-3
    norms = out.preds["normal"].norm(dim=1)
    assert (norms - 1).abs().max() < 1e-5
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def _train(root, run_dir, *extra) -> dict:
    argv = ["train", "--run-dir", str(run_dir), f"dataset.root={root}", *TINY, *extra]
    assert main(argv) == 0
    return json.loads((run_dir / "final_metrics.json").read_text())


@pytest.mark.parametrize("method", ["sl", "xtc"])
def test_cli_trains_with_bf16_and_channels_last(root, tmp_path, method):
    plain = _train(root, tmp_path / "plain", f"method.name={method}")
    fast = _train(
        root,
        tmp_path / "fast",
        f"method.name={method}",
        "train.amp=bf16",
        "train.channels_last=true",
        "train.deterministic=false",
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in fast["metrics"].values())
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "fast" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(b["model"][k].dtype == a["model"][k].dtype for k in a["model"])  # fp32 weights
    assert plain["metrics"] != fast["metrics"]  # bf16 really ran


def test_cli_fp16_uses_a_grad_scaler_and_rejects_nonlinear_weightings(root, tmp_path):
    _train(root, tmp_path / "fp16", "train.amp=fp16")
    state = load_checkpoint(tmp_path / "fp16" / "checkpoint.pt")
    assert state["scaler"]["scale"] > 0
    _check_options("dwa", amp="fp16")
    with pytest.raises(ConfigError, match=r"train.amp: fp16.*'gradnorm'"):
        _check_options("gradnorm", amp="fp16")


def _check_options(weighting: str, **train) -> None:
    """speed.check_options for a config with ``method.weighting`` and these train keys."""
    from mtpsl.core.config import Config
    from mtpsl.weighting import build_weighting

    config = Config(train=TrainConfig(**train))
    config.method.weighting = weighting
    speed.check_options(config, torch.device("cpu"), build_weighting(weighting, ("a", "b")))


def test_fp16_asks_each_weighting_whether_it_is_linear_in_the_losses(monkeypatch):
    """The weighting declares it (no list of names elsewhere): flipping the flag on a
    strategy's class is all it takes for fp16 to accept it."""
    from mtpsl.weighting import WEIGHTINGS

    declared = [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).linear_in_losses]
    assert speed.linear_weightings() == declared
    assert {"dwa", "uniform"} <= set(declared) and not {"pcgrad", "mgda"} & set(declared)
    with pytest.raises(ConfigError):
        _check_options("pcgrad", amp="fp16")
    monkeypatch.setattr(WEIGHTINGS.get("pcgrad"), "linear_in_losses", True)
    _check_options("pcgrad", amp="fp16")


def test_fp16_loss_scaling_gives_the_unscaled_gradient(root, tmp_path):
    """The scaled losses handed to the weighting, unscaled afterwards, equal plain fp32."""
    from mtpsl.core.config import load_config
    from mtpsl.engine.build import build_experiment, train_loader
    from mtpsl.engine.step import TrainStep, build_optimisation

    grads = {}
    for amp in ["off", "fp16"]:
        config = load_config(None, [f"dataset.root={root}", *TINY, f"train.amp={amp}"])
        torch.manual_seed(0)
        exp = build_experiment(config)
        exp.config.train.amp = "off"  # same fp32 forward: isolate the scaling
        optim = build_optimisation(exp)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp == "fp16" else None
        step = TrainStep(exp, optim, torch.device("cpu"), DistEnv(), scaler)
        batch = next(iter(train_loader(exp, torch.device("cpu"))))
        terms = step.forward_backward(batch)
        optim.unscale(scaler)
        grads[amp] = ([p.grad.clone() for p in exp.model.parameters()], terms["total"])
    for a, b in zip(*(grads[k][0] for k in ("off", "fp16")), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads["off"][1], grads["fp16"][1])


def test_cli_compile_keeps_checkpoint_keys(root, tmp_path, monkeypatch):
    """Dynamo traces the model for real; the "eager" backend skips inductor's C++ codegen,
    which takes minutes on a 2-core CPU (the code path is otherwise the same)."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "eager")
    _train(root, tmp_path / "plain")
    _train(root, tmp_path / "compiled", "train.compile=true")
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_per_sample_xtc_option_trains_through_the_reference_form(root, tmp_path, monkeypatch):
    calls = []
    original = XTCLoss.reference_consistency
    monkeypatch.setattr(
        XTCLoss,
        "reference_consistency",
        lambda self, *a, **k: calls.append(1) or original(self, *a, **k),
    )
    _train(root, tmp_path / "ref", "method.name=xtc", "method.options.implementation=per_sample")
    assert len(calls) == 2  # one per training step
    assert (
        main(
            [
                "train",
                "--run-dir",
                str(tmp_path / "bad"),
                f"dataset.root={root}",
                *TINY,
                "method.name=xtc",
                "method.options.implementation=loop",
            ]
        )
        == 2
    )


def test_bad_speed_options_are_config_errors(root, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--run-dir",
                str(tmp_path / "x"),
                f"dataset.root={root}",
                *TINY,
                "train.amp=fp32",
            ]
        )
        == 2
    )
    assert "train.amp" in capsys.readouterr().err
    _train(root, tmp_path / "off", "train.amp=off")  # YAML's boolean "off" is accepted


def test_fused_default_reaches_the_optimiser_and_groups_override_it():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [OptimGroup("main", [p]), OptimGroup("own", [q], extra={"foreach": True})]
    optim = Optimisation.build(groups, OptimConfig(), 1, {"foreach": False})
    assert [o.defaults["foreach"] for o in optim.optimizers] == [False, True]
    assert speed.optimizer_extra(TrainConfig(), torch.device("cpu")) == {}
    assert speed.optimizer_extra(TrainConfig(), torch.device("cuda")) == {"fused": True}
    assert speed.optimizer_extra(TrainConfig(fused_optimizer=False), torch.device("cuda")) == {}


# -- auto: precision, layout, threads and workers from the hardware --------------------------

NATIVE = speed.Hardware("cpu", "Test CPU with bf16", True, False, "AVX512, avx512_bf16")
EMULATED = speed.Hardware("cpu", "Test CPU without bf16", False, False,
                          "AVX2, no avx512_bf16 or amx_bf16")


@pytest.fixture
def hardware(monkeypatch):
    """Pretend to run on a given CPU: ``hardware(NATIVE)``; each test starts with nothing
    said yet (the start-up line and the emulation warning are once per process)."""
    monkeypatch.setattr(speed, "_SAID", set())

    def use(hw: speed.Hardware) -> None:
        monkeypatch.setattr(speed, "probe_hardware", lambda device: hw)

    return use


def _resolved(**train) -> tuple[TrainConfig, speed.SpeedChoice]:
    from mtpsl.core.config import Config

    config = Config(train=TrainConfig(**train))
    choice = speed.resolve_speed(config, torch.device("cpu"))
    choice.announce(torch.device("cpu"))  # as a run does once its set-up is checked
    return config.train, choice


@pytest.mark.parametrize(("hw", "amp"), [(NATIVE, "bf16"), (EMULATED, "off")])
def test_auto_precision_is_bf16_only_where_it_is_native(hardware, capsys, hw, amp):
    hardware(hw)
    cfg, choice = _resolved()
    assert (cfg.amp, cfg.channels_last, choice.amp) == (amp, True, amp)
    assert hw.name in choice.reasons["amp"] and choice.reasons["amp"].startswith("auto")
    err = capsys.readouterr().err
    assert err.count("speed: ") == 1 and hw.name in err and "warning" not in err
    _resolved()  # a second run in the process (a compare grid) says nothing new
    assert capsys.readouterr().err == ""


def test_explicit_values_are_kept_and_emulated_bf16_warns_once(hardware, capsys):
    hardware(EMULATED)
    cfg, _ = _resolved(amp="bf16", channels_last=False)
    assert (cfg.amp, cfg.channels_last) == ("bf16", False)
    _resolved(amp="bf16")
    err = capsys.readouterr().err
    assert err.count("warning: train.amp=bf16") == 1
    warning = next(x for x in err.splitlines() if x.startswith("warning"))
    assert EMULATED.name in warning and "ms in bf16" in warning and "ms in fp32" in warning
    hardware(NATIVE)
    assert _resolved(amp="bf16")[0].amp == "bf16"  # native: no warning
    assert "warning" not in capsys.readouterr().err


def test_the_gramian_form_trains_in_fp32(hardware):
    """torchjd's autogram engine fails under autocast (a dtype error deep in its vmapped
    backward): auto picks fp32 for it even where bf16 is native, an explicit bf16 is refused."""
    from mtpsl.core.config import Config, MethodConfig
    from mtpsl.weighting import build_weighting

    hardware(NATIVE)
    method = MethodConfig(weighting="mgda", weighting_gradients="gramian")
    config = Config(method=method)
    choice = speed.resolve_speed(config, torch.device("cpu"))
    assert config.train.amp == "off" and "gramian" in choice.reasons["amp"]
    weighting = build_weighting("mgda", ["a", "b"], gradients="gramian")
    explicit = Config(method=method, train=TrainConfig(amp="bf16"))
    with pytest.raises(ConfigError, match=r"train\.amp: bf16: the Gram engine"):
        speed.check_options(explicit, torch.device("cpu"), weighting)


def test_channels_last_auto_follows_device_and_precision():
    gpu_old = speed.Hardware("cuda", "T4", False, True, "compute capability 7.5")
    gpu_new = speed.Hardware("cuda", "H100", True, True, "compute capability 9.0", tf32=True)
    assert speed.choose_channels_last("auto", "off", NATIVE)[0] is True
    assert speed.choose_channels_last("auto", "off", EMULATED)[0] is True
    assert speed.choose_channels_last("auto", "off", gpu_old)[0] is False
    assert speed.choose_channels_last("auto", "fp16", gpu_old)[0] is True
    assert speed.choose_channels_last("auto", "off", gpu_new)[0] is True
    assert speed.choose_channels_last(False, "bf16", gpu_new)[0] is False
    assert speed.choose_amp("auto", gpu_old)[0] == "off"
    assert speed.choose_amp("auto", gpu_new)[0] == "bf16"
    mps = speed.Hardware("mps", "mps", False, False, "not probed")
    assert speed.choose_amp("auto", mps)[0] == "off"


def test_threads_and_workers_auto_take_the_usable_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(speed, "usable_cpus", lambda: (1, "cgroup quota"))
    try:
        assert speed.choose_threads("auto")[0] == 1  # capped: a container's quota
        assert speed.choose_threads(3)[0] == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert speed.choose_threads("auto")[0] == 1
        monkeypatch.setattr(speed, "usable_cpus", lambda: (32, "affinity"))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert speed.loader_workers("auto", torch.device("cuda")) == 7
        assert speed.loader_workers("auto", torch.device("cpu")) == 0
        assert speed.loader_workers(3, torch.device("cpu")) == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert speed.loader_workers("auto", torch.device("cuda")) == 8
        # auto never raises torch's count (OMP_NUM_THREADS, or a count set before)
        assert speed.choose_threads("auto")[0] == before
    finally:
        torch.set_num_threads(before)


def _train_auto(root, run_dir, *extra) -> dict:
    argv = ["train", "--run-dir", str(run_dir), f"dataset.root={root}", *TINY_AUTO, *extra]
    assert main(argv) == 0
    return json.loads((run_dir / "final_metrics.json").read_text())


def test_runs_record_the_resolved_precision_and_never_pool_across_it(hardware, root,
                                                                      tmp_path, capsys):
    """The same command on the two CPU classes: config.yaml, the set-up and the environment
    say bf16 or off (never auto), so the runs are two set-ups, not two seeds of one."""
    import yaml

    finals = {}
    for hw in (NATIVE, EMULATED):
        hardware(hw)
        finals[hw.name] = _train_auto(root, tmp_path / hw.name)
        saved = yaml.safe_load((tmp_path / hw.name / "config.yaml").read_text())["train"]
        assert saved["amp"] == ("bf16" if hw.native_bf16 else "off")
        assert saved["channels_last"] is True and saved["threads"] == "auto"
    native, emulated = finals[NATIVE.name], finals[EMULATED.name]
    assert native["setup"]["train"]["amp"] == "bf16" and emulated["setup"]["train"]["amp"] == "off"
    assert native["setup_signature"] != emulated["setup_signature"]
    env = native["environment"]
    assert env["amp"] == "bf16" and NATIVE.name in env["amp_reason"]
    assert {"channels_last", "threads", "threads_reason", "num_workers", "native_bf16"} <= set(env)
    assert "no native bf16" in emulated["environment"]["amp_reason"]
    capsys.readouterr()


def test_resume_keeps_the_recorded_precision_and_warns_where_it_is_emulated(
        hardware, root, tmp_path, capsys):
    import yaml

    hardware(NATIVE)
    _train_auto(root, tmp_path / "run")
    capsys.readouterr()
    hardware(EMULATED)  # resumed on a machine without bf16
    assert main(["train", "--resume", str(tmp_path / "run"), "train.epochs=2"]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["amp"] == "bf16"
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["setup"]["train"]["amp"] == "bf16"
    assert capsys.readouterr().err.count("warning: train.amp=bf16") == 1


def test_bad_auto_keys_name_the_key_and_the_allowed_values(root, tmp_path, capsys):
    for bad, key in (("train.channels_last=maybe", "auto, true or false"),
                     ("train.threads=0", "auto or an integer in [1, 4096]"),
                     ("train.num_workers=-1", "auto or an integer in [0, 256]")):
        argv = ["train", "--run-dir", str(tmp_path / "x"), f"dataset.root={root}", *TINY, bad]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert bad.split("=")[0] in err and key in err
