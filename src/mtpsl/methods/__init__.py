"""Method registry; importing this package registers every built-in method."""

from . import supervised  # noqa: F401  (registers stl, sl)
from .base import METHODS, Losses, Method, OptimGroup, build_method, supervised_losses

__all__ = ["METHODS", "Losses", "Method", "OptimGroup", "build_method", "supervised_losses"]
