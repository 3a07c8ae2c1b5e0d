"""Encoders: an image in, multi-scale features out, with declared channels and reductions.

Every module of this package registers its encoders in ``ENCODERS``; adding a backbone family
is adding a file (see ``docs/extending.md``).
"""

from mtpsl.core.registry import discover
from mtpsl.models.encoders.base import ENCODERS, Encoder, EncoderSpec, build_encoder

discover(__name__, __path__)

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "build_encoder"]
