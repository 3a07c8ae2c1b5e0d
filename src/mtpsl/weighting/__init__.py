"""Loss-weighting strategies: how per-task losses become the gradient that is applied.

Applied outside the methods (a method returns per-task losses; see mtpsl.methods.base), so any
method combines with any strategy. A strategy owns the backward pass because several of them
(GradNorm, MGDA, PCGrad, CAGrad) act on per-task gradients rather than on a weighted sum. A
strategy may hold learnable parameters (optimised with the model, or in its own optimiser
group) and must cope with a task absent from a batch: its loss is then an exact 0 that does
not depend on the parameters, and the strategy must neither divide by it nor let it disturb
its state.

Strategies: ``uniform`` (plain sum), ``uncertainty`` (Kendall et al. 2018), ``gradnorm``
(Chen et al. 2018), ``dwa`` (Liu et al. 2019), ``mgda`` (Sener & Koltun 2018), ``pcgrad``
(Yu et al. 2020), ``cagrad`` (Liu et al. 2021).

Gradient strategies (mgda, pcgrad, cagrad) take one gradient per present task with respect to
the model's shared parameters, reduce them to their T x T Gram matrix, and turn it into one
coefficient per task, so the applied shared gradient is ``sum_k alpha_k g_k`` (PCGrad's
projections and CAGrad's update are linear in the task gradients too). The remaining
parameters (task heads) and the method's ``extra`` terms get an ordinary backward pass. With no
shared parameters (single-task learning's separate networks) there is nothing to reconcile and
these strategies, like GradNorm, fall back to the plain sum.

Strategies that need to know which tasks are present read ``present`` on the host (one device
sync per step): an absent task's parameters are then left out of the graph, so their gradient
stays ``None`` and the optimiser (Adam's momentum included) does not move them.

Adding a strategy is adding a file to this package: subclass :class:`Weighting`, set
``Options`` if it takes any, register it (see ``docs/extending.md``).
"""

from ..registry import discover
from .base import WEIGHTINGS, NoOptions, Weighting, build_weighting
from .cagrad import cagrad_coefficients, cagrad_dual, project_simplex
from .dwa import dwa_weights
from .mgda import min_norm_coefficients
from .pcgrad import pcgrad_coefficients

discover(__name__, __path__)

__all__ = [
    "WEIGHTINGS",
    "NoOptions",
    "Weighting",
    "build_weighting",
    "cagrad_coefficients",
    "cagrad_dual",
    "dwa_weights",
    "min_norm_coefficients",
    "pcgrad_coefficients",
    "project_simplex",
]
