"""Stable import path: ``mtpsl.splits`` is :mod:`mtpsl.data.splits`."""

import sys

from mtpsl.data import splits as _module

sys.modules[__name__] = _module
