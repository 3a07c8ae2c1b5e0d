"""What every figure shares: the PNG + PDF writer, sizes, run labels, run histories, the grid
of titled image panels, and the request a figure function receives.

Figures use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so nothing here
touches the global backend; matplotlib is imported where a figure is drawn, which keeps
``mtpsl figures --help`` light.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtpsl.core.errors import DataError, MtpslError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ARROWS = {True: "↑", False: "↓"}

DPI = 100

CELL_IN = 1.8
"""Width (inches) of one image cell of the qualitative grid."""

TITLE_IN = 0.42
"""Height (inches) above each image cell for its two-line title."""

PANEL_IN = (4.0, 3.0)
"""(width, height) in inches of one panel of the curves figure."""


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**kwargs)

def save(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` (the figure's own size: no tight cropping)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    return paths

def default_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Method names if they tell the runs apart, else folder names, else longer path tails."""
    methods = []
    for run in run_dirs:
        final = Path(run) / "final_metrics.json"
        methods.append(json.loads(final.read_text()).get("method") if final.is_file() else None)
    if None not in methods and len(set(methods)) == len(methods):
        return [str(m) for m in methods]
    parts = [Path(r).resolve().parts for r in run_dirs]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in run_dirs]

def check_labels(run_dirs: Sequence, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return default_labels([Path(r) for r in run_dirs])
    if len(labels) != len(run_dirs):
        raise MtpslError(f"{len(labels)} labels given for {len(run_dirs)} runs")
    return list(labels)

def read_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch rows of a run (``metrics.jsonl``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist (not a run folder?)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as err:
        raise DataError(f"{path}: not JSON lines ({err})") from None

def plot_panel_grid(
    rows: Sequence[Sequence[tuple]],
    titles: Sequence[Sequence[str]],
    image_hw: tuple[int, int],
    width: float,
    out_stem: str | Path,
) -> list[Path]:
    """Rows of titled image panels, each CELL_IN wide with the image's aspect; a panel is
    ``(array, imshow_kwargs)``. Shared by every per-image figure. Returns [png, pdf]."""
    h, w = image_hw
    cell_h = CELL_IN * h / w
    height = len(rows) * (cell_h + TITLE_IN)
    fig = _figure(figsize=(width, height), dpi=DPI)
    pad = 0.03 * CELL_IN
    for k, row in enumerate(rows):
        top = height - k * (cell_h + TITLE_IN) - TITLE_IN
        for c, (array, kwargs) in enumerate(row):
            ax = fig.add_axes(((c * CELL_IN + pad) / width, (top - cell_h + pad) / height,
                               (CELL_IN - 2 * pad) / width, (cell_h - 2 * pad) / height))
            ax.imshow(array, aspect="auto", interpolation="nearest", **kwargs)
            ax.set_title(titles[k][c], fontsize=7, pad=2)
            ax.set_axis_off()
    return save(fig, out_stem)

@dataclass
class FigureRequest:
    """What ``mtpsl figures NAME`` passes to a figure function."""

    runs: list[Path]
    out: Path
    labels: list[str] | None = None
    indices: list[int] = field(default_factory=list)
    split: str | None = None
    root: str | None = None
    device: str = "auto"
    options: dict = field(default_factory=dict)
    """Values of the figure's own arguments (``FigureSpec.add_arguments``)."""

@dataclass(frozen=True)
class FigureSpec:
    make: Callable[[FigureRequest], list[Path]]
    help: str
    uses_images: bool = False
    """The command then requires ``--indices`` and offers ``--split/--root/--device``."""
    add_arguments: Callable | None = None
    """Adds the figure's own command-line options; their values land in ``options``."""
