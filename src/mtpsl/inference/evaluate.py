"""``mtpsl eval``: a trained run's checkpoint scored on a dataset split."""

from __future__ import annotations

from collections.abc import Mapping

from mtpsl.core.errors import DataError, NonFiniteResultError
from mtpsl.data.batch import PartialLabelSet
from mtpsl.engine.build import eval_loader, open_dataset, resolve_device
from mtpsl.engine.evaluate import evaluate
from mtpsl.engine.speed import prepare_for_evaluation
from mtpsl.inference.load import load_run
from mtpsl.tasks import Task, task_kind


def evaluate_checkpoint(
    run: str | None,
    checkpoint: str | None,
    split: str | None = None,
    root: str | None = None,
    device: str = "auto",
    edge_measure: str | None = None,
    edge_workers: int | None = None,
) -> dict:
    """``mtpsl eval``: rebuild a run's model from its checkpoint and evaluate it on its
    dataset, or on ``root``, another folder of the same layout (the training data need not
    exist); ``edge_measure`` re-scores edge tasks with another measure (e.g. the published
    ``bsds`` for a run monitored with ``dilation``), ``edge_workers`` in that many processes."""
    dev = resolve_device(device)
    loaded = load_run(run, checkpoint, root, dev)
    config = loaded.config
    split_name = split or config.dataset.eval_split
    try:
        dataset = open_dataset(config, split_name)
    except DataError as err:
        if root:
            raise
        raise DataError(f"{err}; to evaluate on another folder of the same layout, pass "
                        "--data DIR") from None
    check_same_tasks(loaded.tasks, dataset.tasks, f"{config.dataset.root} ({split_name})")
    tasks = loaded.tasks
    if edge_measure is not None or edge_workers is not None:
        tasks = {n: t.with_scoring(edge_measure, edge_workers) for n, t in tasks.items()}
    loader = eval_loader(PartialLabelSet(dataset, tasks), config, dev)
    prepare_for_evaluation(loaded.model, config.train)  # the run's precision and layout
    try:
        metrics = evaluate(loaded.model, loader, tasks, dev, config.train.progress, split_name,
                           amp=config.train.amp, channels_last=config.train.channels_last)
    except NonFiniteResultError as err:  # a diverged run's numbers are not results
        raise NonFiniteResultError(
            f"{loaded.checkpoint} (epoch {loaded.epoch}) gives non-finite results on the "
            f"{split_name} split ({err.summary()}): the run diverged in training; its "
            "metrics are not served", err.found) from None
    return {"checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch, "split": split_name,
            "root": config.dataset.root, "metrics": metrics}


def check_same_tasks(model: Mapping[str, Task], data: Mapping[str, Task], where: str) -> None:
    """The dataset labels the tasks the model predicts, in its order (items list their labels
    by position), each with the same output (kind and channels): scoring against another
    definition would give meaningless numbers."""
    if list(data) != list(model):
        raise DataError(f"dataset {where} has the tasks {list(data)}, but the model predicts "
                        f"{list(model)}")
    for name, task in model.items():
        other = data[name]
        if task_kind(other) != task_kind(task) or other.out_channels != task.out_channels:
            raise DataError(f"dataset {where}: task {name!r} is a {task_kind(other)} task with "
                            f"{other.out_channels} channels, but the model's is a "
                            f"{task_kind(task)} task with {task.out_channels}")
