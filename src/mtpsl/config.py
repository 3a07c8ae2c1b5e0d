"""Stable import path: ``mtpsl.config`` is :mod:`mtpsl.core.config`."""

import sys

from mtpsl.core import config as _module

sys.modules[__name__] = _module
