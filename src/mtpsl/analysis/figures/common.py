"""What every figure shares: the PNG + PDF writer, sizes, run labels, run histories, the grid
of titled image panels, and the request a figure function receives.

Figures use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so nothing here
touches the global backend; matplotlib is imported where a figure is drawn, which keeps
``mtpsl figures --help`` light.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mtpsl.core.errors import DataError, MtpslError
from mtpsl.core.files import encoded, write_all

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mtpsl.core.render import Key

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
    # both files or neither: a full disk keeps the previous figure whole
    write_all({path: encoded(functools.partial(fig.savefig, dpi=DPI, format=path.suffix[1:]))
               for path in paths})
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
    keys: Sequence[tuple[int, int, Key]] = (),
) -> list[Path]:
    """Rows of titled image panels, each CELL_IN wide with the image's aspect, and below them
    the ``keys`` (``(first column, columns spanned, key)``: class legends, colour bars with
    units, the normals' colour disc; see :func:`mtpsl.core.render.panel_grid`); a panel is
    ``(array, imshow_kwargs)``. Shared by every per-image figure. Returns [png, pdf]."""
    from mtpsl.core.render import panel_grid

    fig = panel_grid(rows, titles, image_hw, width, CELL_IN, TITLE_IN, keys, DPI)
    return save(fig, out_stem)


def grid_height(n_rows: int, image_hw: tuple[int, int],
                keys: Sequence[tuple[int, int, Key]] = ()) -> float:
    """Height (inches) of :func:`plot_panel_grid`'s figure."""
    from mtpsl.core.render import grid_height as height
    from mtpsl.core.render import keys_height

    return height(n_rows, image_hw, CELL_IN, TITLE_IN, keys_height(keys, CELL_IN))


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
