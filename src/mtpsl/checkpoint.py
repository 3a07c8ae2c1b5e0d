"""Stable import path: ``mtpsl.checkpoint`` is :mod:`mtpsl.engine.checkpoint`."""

import sys

from mtpsl.engine import checkpoint as _module

sys.modules[__name__] = _module
