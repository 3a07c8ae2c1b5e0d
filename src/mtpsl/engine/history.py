"""A run's per-epoch rows: ``metrics.jsonl`` in its folder (``metrics.csv`` is the ``csv``
logging backend's, :mod:`mtpsl.engine.callbacks.loggers`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mtpsl.core.errors import DataError
from mtpsl.core.files import write_text


@dataclass
class History:
    """Per-epoch rows, mirrored to metrics.jsonl after every epoch."""

    run_dir: Path
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path, upto_epoch: int) -> History:
        """The rows of epochs 1..``upto_epoch`` (later ones were logged after the checkpoint
        and are trained again); a malformed file is a DataError naming the line."""
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return cls(run_dir)
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                epoch = row["epoch"]
            except (json.JSONDecodeError, TypeError, KeyError):
                raise DataError(f"{path}: line {number} is not a metrics row "
                                "(JSON object with an 'epoch')") from None
            if epoch <= upto_epoch:
                rows.append(row)
        if [r["epoch"] for r in rows] != list(range(1, upto_epoch + 1)):
            raise DataError(f"{path}: does not hold one row for each of epochs 1..{upto_epoch}, "
                            "which the checkpoint has done")
        return cls(run_dir, rows)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        lines = "".join(json.dumps(r) + "\n" for r in self.rows)
        write_text(self.run_dir / "metrics.jsonl", lines)

    def last_eval(self) -> dict | None:
        rows = [r for r in self.rows if any(k.startswith("eval/") for k in r)]
        return rows[-1] if rows else None
