"""Architectures. Importing this package registers every built-in model in ``MODELS``."""

from mtpsl.models import mtan as mtan  # import registers "mtan"
from mtpsl.models import resnet as resnet  # import registers "resnet"
from mtpsl.models import segnet as segnet  # import registers "segnet"
from mtpsl.models import xtask_net as xtask_net  # registers "xtask_net"
from mtpsl.models.base import (
    MODELS,
    HeadSpec,
    ModelOutput,
    PerTaskModels,
    build_model,
    count_parameters,
    shared_parameters,
)
from mtpsl.models.segnet import SegNet, conv_bn_relu

__all__ = [
    "MODELS",
    "HeadSpec",
    "ModelOutput",
    "PerTaskModels",
    "SegNet",
    "build_model",
    "conv_bn_relu",
    "count_parameters",
    "shared_parameters",
]
