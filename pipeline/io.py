"""Files of the pipeline: JSON / CSV / figures written atomically (through :mod:`scoresde.atomic`, the one
atomic-write helper; a write that runs out of space raises its ``DiskFullError``, an ``OSError`` whose
message names the path), JSON read with a message that names the stage to run, and a wall-clock timer."""
from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterable

from scoresde.atomic import DiskFullError, atomic_path, atomic_write_text

__all__ = ["DiskFullError", "atomic_path", "write_json", "read_json", "write_csv", "save_figure", "Timer", "fingerprint", "file_md5"]


def fingerprint(*parts) -> str:
    """A stable hash of JSON-able parts: the key of checkpoints and resumable batches."""
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that produces it first (dvc repro)")
    return json.loads(path.read_text())


def write_csv(path: str | Path, header: list[str], rows: Iterable) -> None:
    """Rows as lists (in ``header`` order) or dicts keyed by ``header``."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        rows = list(rows)
        if rows and isinstance(rows[0], dict):
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
        else:
            writer = csv.writer(fh)
            writer.writerow(header)
        writer.writerows(rows)


def save_figure(fig, path: str | Path, dpi: int = 90) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
