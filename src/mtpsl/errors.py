"""Stable import path: ``mtpsl.errors`` is :mod:`mtpsl.core.errors`."""

import sys

from mtpsl.core import errors as _module

sys.modules[__name__] = _module
