"""Method registry; importing this package registers every built-in method."""

from . import supervised, xtc  # noqa: F401  (register stl, sl, xtc)
from .base import METHODS, Losses, Method, OptimGroup, build_method, supervised_losses
from .joint_alternatives import ContrastiveLoss  # noqa: F401  (contrastive, discriminator)
from .mean_teacher import MeanTeacher  # noqa: F401  (registers mean_teacher)
from .pseudo_label import PseudoLabel  # noqa: F401  (registers pseudo_label)
from .semimtl import SemiMTL  # noqa: F401  (registers jtl, semisd, semimtl)
from .ssl import CropConsistency  # noqa: F401  (registers ssl)
from .task_maps import DirectMap  # noqa: F401  (registers direct_map, perceptual_map)
from .xtask import TaskTransfer  # noqa: F401  (registers xtask)

__all__ = ["METHODS", "Losses", "Method", "OptimGroup", "build_method", "supervised_losses"]
