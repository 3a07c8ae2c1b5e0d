"""``mtpsl eval``: a trained run's checkpoint scored on a dataset split."""

from __future__ import annotations

from mtpsl.data.batch import PartialLabelSet
from mtpsl.engine.build import eval_loader, open_dataset, resolve_device
from mtpsl.engine.evaluate import evaluate
from mtpsl.inference.load import load_run


def evaluate_checkpoint(
    run: str | None,
    checkpoint: str | None,
    split: str | None = None,
    root: str | None = None,
    device: str = "auto",
    edge_measure: str | None = None,
    edge_workers: int | None = None,
) -> dict:
    """``mtpsl eval``: rebuild a run's model from its checkpoint and evaluate it;
    ``edge_measure`` re-scores edge tasks with another measure (e.g. the published ``bsds``
    for a run monitored with ``dilation``), ``edge_workers`` in that many processes."""
    dev = resolve_device(device)
    loaded = load_run(run, checkpoint, root, dev)
    config = loaded.config
    split_name = split or config.dataset.eval_split
    dataset = open_dataset(config, split_name)
    tasks = loaded.tasks
    if edge_measure is not None or edge_workers is not None:
        tasks = {n: t.with_scoring(edge_measure, edge_workers) for n, t in tasks.items()}
    loader = eval_loader(PartialLabelSet(dataset, tasks), config, dev)
    metrics = evaluate(loaded.model, loader, tasks, dev, config.train.progress, split_name)
    return {"checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch, "split": split_name,
            "root": config.dataset.root, "metrics": metrics}
