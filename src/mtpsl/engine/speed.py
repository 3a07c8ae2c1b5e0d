"""Speed options of the training step: autocast, channels_last, torch.compile, fused optimisers.

Mixed precision keeps every loss, normalisation and metric in fp32: the model's task
activations (log-softmax, L2 normalisation of normals) are run in fp32 outside autocast, and
its outputs are cast to fp32 before a method sees them, so only convolutions and matmuls
(the model's and the method's networks) run in bf16/fp16.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtpsl.core.config import Config, TrainConfig
from mtpsl.core.errors import ConfigError
from mtpsl.models import ModelOutput, MultiTaskModel
from mtpsl.weighting import WEIGHTINGS, Weighting

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND = "inductor"
"""torch.compile backend of ``train.compile`` (tests use "eager": tracing without codegen)."""
def linear_weightings() -> list[str]:
    """Registered weightings whose gradient is linear in the task losses within a step, so
    scaling the losses by the fp16 loss scale scales the gradient alike (GradScaler's
    contract): each declares ``linear_in_losses``."""
    return [n for n in WEIGHTINGS.names() if WEIGHTINGS.get(n).linear_in_losses]


def accumulable_weightings() -> list[str]:
    """Linear weightings that draw nothing per step: k summed micro-batches equal one step on
    k times the batch."""
    return [n for n in linear_weightings() if not WEIGHTINGS.get(n).draws_per_step]


def check_options(config: Config, device: torch.device, weighting: Weighting) -> None:
    """Reject combinations that cannot work, naming the config keys (``weighting`` is the
    configured strategy, built)."""
    cfg, name = config.train, config.method.weighting
    if cfg.amp == "fp16" and not weighting.linear_in_losses:
        raise ConfigError(
            f"train.amp: fp16 needs a loss scale, which is exact only for weightings linear "
            f"in the losses ({', '.join(linear_weightings())}); method.weighting is "
            f"{name!r}: use train.amp=bf16 or off"
        )
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
    """The autocast context of ``train.amp`` (a no-op for ``off``)."""
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
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.compile:  # inductor's own determinism flag, left unset at start (see experiment)
        torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                           warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
        model.compile(backend=COMPILE_BACKEND)


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
        if cfg.channels_last:
            m.to(memory_format=torch.channels_last)


def to_channels_last(batch, enabled: bool):
    """The batch with its images in NHWC memory (labels are left alone)."""
    if not enabled:
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
