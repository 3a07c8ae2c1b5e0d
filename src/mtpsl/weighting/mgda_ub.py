"""``mgda_ub``: MGDA on the gradients of the shared representation (Sener & Koltun, NeurIPS
2018, section 3.3, "MGDA-UB").

The min-norm weights are found from the gradients of the task losses with respect to the
representation ``z`` every head reads instead of the shared parameters: the paper bounds
``||sum_k alpha_k dL_k/dtheta|| <= ||dz/dtheta|| ||sum_k alpha_k dL_k/dz||`` and minimises
the right-hand factor, which needs one backward pass through the heads per task rather than
through the whole network. The weights then scale the losses, heads included, as in
``mgda``; options (``normalisation``) and solver are ``mgda``'s. It is ``mgda`` with
``method.weighting_gradients=representation``, under its paper's name; the model must give
the representation (``features["shared"]``: segnet, dense/resnet).
"""

from __future__ import annotations

from mtpsl.weighting.base import WEIGHTINGS
from mtpsl.weighting.mgda import MGDA


@WEIGHTINGS.register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB: MGDA's min-norm weights from the shared representation's gradients."""

    gradients = "representation"
