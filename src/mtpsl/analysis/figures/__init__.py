"""Figures of finished runs, written as ``<stem>.png`` and ``<stem>.pdf``.

``mtpsl figures NAME`` dispatches on :data:`FIGURES`: adding a figure is one module with a
function taking a :class:`~mtpsl.analysis.figures.common.FigureRequest` and returning the
written paths, plus one :class:`~mtpsl.analysis.figures.common.FigureSpec` entry here.
"""

from mtpsl.analysis.figures.common import FigureRequest, FigureSpec
from mtpsl.analysis.figures.curves import curves_figure
from mtpsl.analysis.figures.joint import add_arguments as joint_space_arguments
from mtpsl.analysis.figures.joint import joint_space_figure
from mtpsl.analysis.figures.qualitative import qualitative_figure
from mtpsl.analysis.figures.seeds import seeds_arguments, seeds_figure

FIGURES: dict[str, FigureSpec] = {
    "curves": FigureSpec(curves_figure, "primary metrics and train loss over epochs per run"),
    "seeds": FigureSpec(
        seeds_figure, "every seed's primary metrics and paired Δm per set-up, with the mean "
        "and its 95% interval (--runs takes run folders or grids, like `mtpsl report`)",
        add_arguments=seeds_arguments),
    "qualitative": FigureSpec(
        qualitative_figure, "RGB, ground truth and each run's predictions with per-image "
        "scores (paper 001, Fig. 4)", uses_images=True),
    "joint-space": FigureSpec(
        joint_space_figure, "an xtc run's mapped joint-space features of a task pair "
        "(--pair, default the run's first two tasks): PCA of both branches and their "
        "per-position cosine (paper 001, Fig. 3)", uses_images=True,
        add_arguments=joint_space_arguments),
}
"""Figures ``mtpsl figures`` offers: name -> spec (the command dispatches on this)."""

__all__ = ["FIGURES", "FigureRequest", "FigureSpec"]
