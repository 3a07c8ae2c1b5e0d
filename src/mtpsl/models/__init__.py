"""Architectures. Every module of this package is imported here, so each registers its models
in ``MODELS`` (and ``encoders/`` its backbones in ``ENCODERS``): adding one is adding a file."""

from mtpsl.core.registry import discover
from mtpsl.models.base import (
    MODELS,
    FeatureInfo,
    HeadSpec,
    ModelOutput,
    MultiTaskModel,
    PerTaskModels,
    as_multitask,
    build_model,
    check_input_size,
    count_parameters,
    require_encoder_info,
    shared_parameters,
)
from mtpsl.models.segnet import SegNet, conv_bn_relu

discover(__name__, __path__)

__all__ = [
    "MODELS",
    "FeatureInfo",
    "HeadSpec",
    "ModelOutput",
    "MultiTaskModel",
    "PerTaskModels",
    "SegNet",
    "as_multitask",
    "build_model",
    "check_input_size",
    "conv_bn_relu",
    "count_parameters",
    "require_encoder_info",
    "shared_parameters",
]
