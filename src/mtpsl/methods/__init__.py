"""Methods: how partial labels become losses. Every module of this package is imported here,
so each registers its methods in ``METHODS``: adding a method is adding a file (see
``docs/extending.md``)."""

from mtpsl.core.registry import discover
from mtpsl.methods.base import METHODS, Losses, Method, OptimGroup, build_method, supervised_losses

discover(__name__, __path__)

__all__ = ["METHODS", "Losses", "Method", "OptimGroup", "build_method", "supervised_losses"]
