"""A ``compare`` grid: its cells (regime x method x seed), each cell's run config, the checks
made before anything trains, continuing a cell, and the tables of a finished grid.

Kept apart from :mod:`mtpsl.analysis.compare` (which picks a launcher) so that the launchers
and the job that trains one cell on a cluster node import the grid without importing each
other. Each cell is an ordinary run in ``OUT/<regime>/<method>/seed<k>``: where it trained
changes nothing in it, so the tables of a grid are the same however its cells were run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mtpsl.analysis import report
from mtpsl.analysis.figures.seeds import plot_seeds
from mtpsl.core.config import Config, LauncherConfig, MethodVariant, build_config
from mtpsl.core.errors import ConfigError, RunFolderError
from mtpsl.core.files import write_all
from mtpsl.core.rundir import holds_run
from mtpsl.engine.build import check_names, method_for, open_dataset, weighting_for
from mtpsl.engine.run import resume, saved_config_difference, train
from mtpsl.tasks.scoring import higher_is_better
from mtpsl.weighting import WEIGHTINGS

FINAL = "final_metrics.json"


@dataclass(frozen=True)
class Cell:
    """One run of a grid."""

    regime: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        """The cell's folder relative to the grid's: ``onelabel/sl/seed0``."""
        return f"{_slug(self.regime)}/{self.method}/seed{self.seed}"

    def folder(self, out: Path) -> Path:
        return Path(out) / self.key

    def done(self, out: Path) -> bool:
        return (self.folder(out) / FINAL).exists()


def sweep_weightings(names: list[str]) -> list[str]:
    """``compare.weightings`` checked, with ``all`` standing for every registered one."""
    if "all" in names:
        names = [n for n in names if n != "all"] + WEIGHTINGS.names()
    for name in names:
        if name not in WEIGHTINGS:
            raise ConfigError(f"compare.weightings: unknown weighting {name!r}; known: all, "
                              f"{', '.join(WEIGHTINGS.names())}")
    return list(dict.fromkeys(names))


def grid_cells(config: Config) -> list[tuple[str, str]]:
    """(regime, method) cells: the grid (each method crossed with ``compare.weightings``
    when given), then the extra cells, without repeats."""
    grid = config.compare
    weightings = sweep_weightings(grid.weightings)
    methods = [m if not weightings or m == grid.baseline else f"{m}+{w}"
               for m in grid.methods for w in (weightings or [""])]
    cells = [(regime, method) for regime in grid.regimes for method in dict.fromkeys(methods)]
    for extra in grid.extra_cells:
        method, sep, regime = extra.partition("@")
        if not sep or not method or not regime:
            raise ConfigError(f"compare.extra_cells: {extra!r} must look like method@regime")
        cells.append((regime, method))
    return list(dict.fromkeys(cells))


def all_cells(config: Config) -> list[Cell]:
    """Every run of the grid, in the order of the tables: cells, then seeds; a cell whose
    variant learns from another's runs (``teacher_from``) after that variant's cells."""
    pairs = sorted(grid_cells(config), key=lambda cell: _teacher_depth(config, cell[1]))
    return [Cell(r, m, s) for r, m in pairs for s in config.compare.seeds]


TEACHER_FROM = "teacher_from"
"""A variant option (``compare.variants.<name>.options.teacher_from: <grid method>``): each
of the variant's cells takes the run of that grid method with the same regime and seed as its
``method.options.teacher`` (e.g. ``hitts`` stage 2 from stage 1). Such cells train after
their teachers' cells, and a teacher run that has not finished is refused."""


def teacher_of(config: Config, method: str) -> str | None:
    """The grid method whose runs teach ``method``'s (its variant's ``teacher_from``)."""
    variant = config.compare.variants.get(method.partition("+")[0])
    return None if variant is None else variant.options.get(TEACHER_FROM)


def _teacher_depth(config: Config, method: str) -> int:
    depth, seen = 0, {method}
    while (method := teacher_of(config, method) or "") and method not in seen:
        depth, seen = depth + 1, seen | {method}
    return depth


def check_teachers(config: Config) -> None:
    """Every ``teacher_from`` names another method of the grid, with a cell in each regime
    of the cells it teaches, and the chain has no cycle."""
    cells = grid_cells(config)
    for regime, method in cells:
        teacher = teacher_of(config, method)
        if teacher is None:
            continue
        key = f"compare.variants.{method.partition('+')[0]}.options.{TEACHER_FROM}"
        if not isinstance(teacher, str) or teacher == method:
            raise ConfigError(f"{key}: {teacher!r}; allowed: another method of the grid")
        if (regime, teacher) not in cells:
            known = sorted({m for r, m in cells if r == regime and m != method})
            raise ConfigError(f"{key}: {teacher!r} has no cell in regime {regime!r}; allowed: "
                              f"{', '.join(known) or '(none)'}")
        seen = {method}
        while teacher is not None:
            if teacher in seen:
                raise ConfigError(f"{key}: the teachers form a cycle ({', '.join(seen)})")
            seen.add(teacher)
            teacher = teacher_of(config, teacher)


def _slug(regime: str) -> str:
    return regime.replace(":", "-")


def cell_config_for(config: Config, regime: str, method: str, seed: int,
                    out: Path | None = None) -> Config:
    """The run config of one cell: the base config with the cell's regime, method and seed.

    ``compare.launcher`` is left at its defaults: how a grid is launched is no part of its
    runs, so a cell started by one launcher continues under another. A variant's
    ``teacher_from`` becomes ``method.options.teacher``: the teaching cell's folder under
    ``out`` (absolute; without ``out``, its key, for the checks before training)."""
    data = config.model_dump()
    data["name"] = f"{_slug(regime)}-{method}-seed{seed}"
    data["label"] = method
    data["compare"]["launcher"] = LauncherConfig().model_dump()
    method, _, weighting = method.partition("+")  # a compare.weightings cell: method+weighting
    data["seed"] = seed
    name, _, ratios = regime.partition(":")
    data["labels"]["regime"] = name
    if ratios:
        try:
            data["labels"]["ratios"] = [float(r) for r in ratios.split(":")]
        except ValueError:
            raise ConfigError(f"compare.regimes: {regime!r} must look like ratio:9:1") from None
    variant = config.compare.variants.get(method)
    if variant is not None:
        data["method"]["name"] = variant.method
        data["method"]["options"] = dict(variant.options)
        data["method"]["network"] = variant.network
        teacher = data["method"]["options"].pop(TEACHER_FROM, None)
        if teacher is not None:
            cell = Cell(regime, str(teacher), seed)
            data["method"]["options"]["teacher"] = (
                str(cell.folder(out).resolve()) if out is not None else cell.key)
        _apply_variant_weighting(data["method"], variant)
    elif method != config.method.name:
        data["method"]["name"] = method
        data["method"]["options"] = {}  # the base options belong to the base method
    if weighting:
        data["method"]["weighting"] = weighting
        data["method"]["weighting_options"] = {}
    return build_config(data, f"compare cell {regime} / {data['label']}")


def _apply_variant_weighting(method: dict, variant: MethodVariant) -> None:
    """A variant's weighting (its options, what it differentiates) replace the base ones
    where it names them."""
    if variant.weighting is not None and variant.weighting != method["weighting"]:
        method["weighting"] = variant.weighting
        method["weighting_options"] = {}  # the base options belong to the base strategy
        method["weighting_gradients"] = None
    if variant.weighting_options is not None:
        method["weighting_options"] = dict(variant.weighting_options)
    if variant.weighting_gradients is not None:
        method["weighting_gradients"] = variant.weighting_gradients


def check_delta_metrics(config: Config) -> None:
    """``compare.delta_metrics`` must name metrics of the dataset's tasks; checked before any
    training so a typo cannot cost a grid."""
    chosen = config.compare.delta_metrics
    if chosen is None:
        return
    known = higher_is_better(open_dataset(config, config.dataset.eval_split).tasks)
    unknown = [k for k in chosen if k not in known]
    if unknown or not chosen:
        what = f"{unknown} are not task/metric keys of the dataset" if unknown else "is empty"
        raise ConfigError(f"compare.delta_metrics: {what}; allowed: {', '.join(known)} "
                          "(or null for each task's primary metric)")


def check_cells(config: Config) -> None:
    """Every cell's config, method and weighting built before any training (a variant's
    option typo, a swept strategy that cannot take the grid's ``weighting_gradients``), so
    that a bad cell cannot stop a grid halfway, after hours of the cells before it."""
    cells = [cell_config_for(config, regime, method, config.compare.seeds[0])
             for regime, method in grid_cells(config)]
    for cell in cells:
        try:
            check_names(cell)
        except ConfigError as err:
            raise ConfigError(f"compare cell {cell.label}: {err}") from None
    tasks = dict(open_dataset(config, config.dataset.train_split).tasks)
    for cell in cells:
        try:
            method_for(cell, tasks)
            weighting_for(cell, tuple(tasks))
        except ConfigError as err:
            raise ConfigError(f"compare cell {cell.label}: {err}") from None


def check_folders(config: Config, out: Path) -> None:
    """A cell folder that holds a run of another config is refused before anything is
    launched (the same check :func:`train_or_continue` makes), not when its turn comes."""
    for cell in all_cells(config):
        folder = cell.folder(out)
        if holds_run(folder):
            _refuse_other_run(folder, cell_config_for(config, *_fields(cell), out=out))


def _fields(cell: Cell) -> tuple[str, str, int]:
    return cell.regime, cell.method, cell.seed


def _refuse_other_run(folder: Path, config: Config) -> None:
    differing = saved_config_difference(folder / "config.yaml", config)
    if differing:
        raise RunFolderError(
            f"grid cell {folder} holds a run whose config differs at {differing} from the "
            "grid's; move or remove that folder to train the cell anew")


def train_or_continue(config: Config, cell: Path) -> dict:
    """Train a cell, or continue it where an interrupted grid left it (its config must be
    the cell's: a changed grid does not silently mix two set-ups in one cell)."""
    if not holds_run(cell):
        return train(config, cell)
    _refuse_other_run(cell, config)
    return resume(cell, [f"train.epochs={config.train.epochs}"])


def load_results(config: Config, out: Path) -> list[dict]:
    """The finished cells' results, in the grid's order (the order of the tables' rows)."""
    return [report.load_result(cell.folder(out)) for cell in all_cells(config)]


def write_tables(tables: Sequence[report.Table], text: str, out: Path) -> None:
    write_all({out / "results.md": (text + "\n").encode(),
               out / "results.csv": report.csv_text(report.table_rows(tables)).encode()})


def write_curves(results: Sequence[Mapping], out: Path) -> list[Path]:
    """``curves.png/.pdf``: each metric over epochs, one line per method (mean over seeds)."""
    from mtpsl.analysis.figures.curves import plot_curve_groups

    several = len({r["regime"] for r in results}) > 1
    groups: dict[str, list[Path]] = {}
    for r in results:
        label = f"{r['regime']}/{r['method']}" if several else r["method"]
        groups.setdefault(label, []).append(Path(r["run_dir"]))
    return plot_curve_groups(groups, out / "curves")


def write_results(config: Config, out: Path, results: Sequence[dict] | None = None) -> str:
    """``results.md`` / ``results.csv`` (the tables), ``curves`` and ``seeds`` figures of a
    finished grid; returns the Markdown."""
    grid = config.compare
    results = load_results(config, out) if results is None else results
    tables = report.build_tables(results, grid.baseline, grid.delta_metrics)
    text = report.tables_markdown(tables, grid.baseline, grid.contrasts)
    write_tables(tables, text, out)
    write_curves(results, out)
    plot_seeds(tables[0], out / "seeds")
    return text

