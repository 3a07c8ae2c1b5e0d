"""Loss-weighting strategies: how per-task losses become the gradient that is applied.

Applied outside the methods (a method returns per-task losses; see mtpsl.methods.base), so any
method combines with any strategy. A strategy owns the backward pass because several of them
(GradNorm, MGDA, PCGrad, CAGrad) act on per-task gradients rather than on a weighted sum. A
strategy may hold learnable parameters (optimised with the model, or in its own optimiser
group) and must cope with a task absent from a batch: its loss is then an exact 0 that does
not depend on the parameters, and the strategy must neither divide by it nor let it disturb
its state. Besides the losses and the method's ``extra`` terms, its backward pass receives one
:class:`GradientContext` filled by the loop: which tasks are present, the shared parameters,
and what ``method.weighting_gradients`` asks to differentiate instead of them.

Strategies: each has its own file in this package (``mtpsl list weightings``; the README's
"Loss weighting" table cites each paper). Loss-level ones weight the losses (``uniform``,
``constant``, ``uncertainty``, ``dwa``, ``rlw``, ``gls``, ``stch``, ``famo``); gradient ones
(:class:`~mtpsl.weighting.gradient.GradientWeighting`: ``mgda``, ``pcgrad``, ``cagrad``,
``nash_mtl``, ``gradvac``, torchjd's...) take one gradient per present task with respect to
the model's shared parameters and turn them (usually their T x T Gram matrix) into the shared
update; the remaining parameters (task heads) and the method's ``extra`` terms get an
ordinary backward pass. With no shared parameters (single-task learning's separate networks)
there is nothing to reconcile and these strategies fall back to the plain sum. Under torchrun
they work from the processes' mean gradients and losses, so the result does not depend on
the number of processes. ``method.weighting_gradients`` offers two cheaper forms to the
strategies that only need the Gram matrix: the gradients of the shared representation
(``representation``) and the shared parameters' Gram matrix from torchjd's autogram engine
without the gradients (``gramian``, :mod:`.gramian`).

Strategies that need to know which tasks are present read ``context.present`` on the host (one
device sync per step): an absent task's parameters are then left out of the graph, so their
gradient stays ``None`` and the optimiser (Adam's momentum included) does not move them.

Adding a strategy is adding a file to this package: subclass :class:`Weighting`, set
``Options`` if it takes any, register it (see ``docs/extending.md``).
"""

from mtpsl.core.registry import discover
from mtpsl.weighting.base import (
    WEIGHTINGS,
    GradientContext,
    NoOptions,
    Weighting,
    build_weighting,
)
from mtpsl.weighting.cagrad import cagrad_coefficients, cagrad_dual, project_simplex
from mtpsl.weighting.dwa import dwa_weights
from mtpsl.weighting.mgda import min_norm_coefficients
from mtpsl.weighting.pcgrad import pcgrad_coefficients

discover(__name__, __path__)

__all__ = [
    "WEIGHTINGS",
    "GradientContext",
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
