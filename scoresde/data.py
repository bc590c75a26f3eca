"""Prepared data: the Parquet format every stage after ``prepare`` reads, and the pixel transforms.

Prepared data (:func:`write_prepared`, :func:`load_prepared`)
-------------------------------------------------------------
One Parquet file written with pyarrow, atomically through :func:`scoresde.atomic.atomic_path`: images as
``image`` (binary, C·H·W uint8 bytes) or points as ``x`` (list<float32>), ``label`` (int64), ``split``
(string); schema metadata ``scoresde.shape`` (JSON list), ``scoresde.dataset``, ``scoresde.kind`` and
``scoresde.meta`` (JSON).
The raw datasets it is made from are loaded by name with :func:`scoresde.datasets.get_dataset`.

Pixel space (:func:`to_model_space`, :func:`from_model_space`, :func:`to_uint8`)
-------------------------------------------------------------------------------
Images are float32 in [0, 1] between stages; :func:`to_model_space` / :func:`from_model_space` map them to
and from the model's space, and :func:`to_uint8` is the project's one uint8 quantisation
(``floor(255·x + 0.5)`` after clamping to [0, 1]) used for Parquet, PNGs and FID / KID alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from scoresde.atomic import atomic_path

__all__ = [
    "PreparedData",
    "write_prepared",
    "load_prepared",
    "to_model_space",
    "from_model_space",
    "to_uint8",
]

# ----------------------------------------------------------------------------------------------------
# Prepared data: Parquet I/O
# ----------------------------------------------------------------------------------------------------

_RESERVED_META = ("shape", "dataset", "kind")
_ROWS_PER_GROUP = 8192


class DatasetError(Exception):
    """Base class of the dataset errors below."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are absent (and no download was asked for, or it failed)."""


class DatasetCorruptedError(DatasetError, ValueError):
    """A dataset file is present but truncated or corrupted (checksum or format mismatch)."""


@dataclass
class PreparedData:
    """Prepared data as tensors: ``x`` float32 — images in [0, 1] ``(B, C, H, W)`` or points ``(B, D)`` —,
    ``labels`` int64 ``(B,)``, ``meta`` (``dataset``, ``shape``, ``kind``, ``num_rows`` and the writer's
    meta), ``split`` the split name of each row."""

    x: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    split: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def write_prepared(
    path: str | os.PathLike,
    images_or_points: Any,
    labels: Any,
    split: str | Sequence[str],
    dataset: str,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write prepared data to one Parquet file, atomically (:func:`scoresde.atomic.atomic_path`).

    ``images_or_points``: uint8 ``(N, C, H, W)`` images (column ``image``, C·H·W bytes per row) or float
    ``(N, D)`` points (column ``x``, list<float32>); ``labels``: ``(N,)`` integers (column ``label``,
    int64); ``split``: one name for all rows or one per row (column ``split``). Schema metadata:
    ``scoresde.shape`` (JSON list), ``scoresde.dataset``, ``scoresde.kind`` (``image``/``points``) and
    ``scoresde.meta`` (``meta`` as JSON). Returns the path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    arr = _to_numpy(images_or_points)
    n = int(arr.shape[0]) if arr.ndim else 0
    if arr.ndim == 4:
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {arr.dtype} — convert with to_uint8")
        kind = "image"
    elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
        kind = "points"
        arr = arr.astype(np.float32, copy=False)
    else:
        raise ValueError(f"expected uint8 images (N, C, H, W) or float points (N, D), got {arr.dtype} "
                         f"{arr.shape}")
    shape = [int(s) for s in arr.shape[1:]]
    lab = _to_numpy(labels)
    if lab.shape != (n,) or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be integers of shape ({n},), got {lab.dtype} {lab.shape}")
    lab = lab.astype(np.int64)
    if isinstance(split, str):
        splits = np.full(n, split, dtype=object)
    else:
        splits = np.asarray([str(s) for s in split], dtype=object)
        if splits.shape != (n,):
            raise ValueError(f"split must be a string or {n} strings, got {splits.shape[0]}")
    meta = dict(meta or {})
    clash = [k for k in _RESERVED_META if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are reserved (written by write_prepared itself)")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from e

    data_field = pa.field("image", pa.binary()) if kind == "image" else pa.field("x", pa.list_(pa.float32()))
    schema = pa.schema([data_field, pa.field("label", pa.int64()), pa.field("split", pa.string())]).with_metadata({
        "scoresde.shape": json.dumps(shape),
        "scoresde.dataset": str(dataset),
        "scoresde.kind": kind,
        "scoresde.meta": meta_json,
    })
    row = int(np.prod(shape))
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for start in range(0, max(n, 1), _ROWS_PER_GROUP):
                stop = min(start + _ROWS_PER_GROUP, n)
                m = stop - start
                flat = np.ascontiguousarray(arr[start:stop]).reshape(-1)
                offsets = pa.py_buffer((np.arange(m + 1, dtype=np.int32) * row).tobytes())
                if kind == "image":
                    col = pa.Array.from_buffers(pa.binary(), m, [None, offsets, pa.py_buffer(flat.tobytes())])
                else:
                    col = pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), m + 1, [None, offsets]),
                                                   pa.array(flat, type=pa.float32()))
                table = pa.Table.from_arrays(
                    [col, pa.array(lab[start:stop], type=pa.int64()),
                     pa.array(list(splits[start:stop]), type=pa.string())], schema=schema)
                writer.write_table(table)
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).schema_arrow.metadata or {}
    md = {k.decode(): v.decode() for k, v in md.items()}
    if "scoresde.shape" not in md or "scoresde.kind" not in md:
        raise ValueError(f"{path} is not a scoresde prepared-data file (no scoresde.* schema metadata)")
    meta = json.loads(md.get("scoresde.meta", "{}"))
    meta.update(dataset=md.get("scoresde.dataset"), shape=json.loads(md["scoresde.shape"]),
                kind=md["scoresde.kind"])
    return meta


def load_prepared(path: str | os.PathLike, split: str | None = None) -> PreparedData:
    """Read a file written by :func:`write_prepared` (optionally only the rows of ``split``).

    Images come back as float32 in [0, 1] (``uint8 / 255``), shape ``(B, C, H, W)``; points as float32
    ``(B, D)``. ``meta`` holds the writer's meta plus ``dataset``, ``shape``, ``kind`` and ``num_rows``.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared data not found: {path}")
    meta = _read_meta(path)
    shape = tuple(meta["shape"])
    table = pq.read_table(path)
    if split is not None:
        mask = pc.equal(table.column("split"), split)
        selected = table.filter(mask)
        if selected.num_rows == 0:
            present = sorted(set(table.column("split").to_pylist()))
            raise ValueError(f"{path}: no rows with split {split!r}; splits present: {present}")
        table = selected
    n = table.num_rows
    row = int(np.prod(shape))
    if meta["kind"] == "image":
        parts = []
        for chunk in table.column("image").chunks:
            if chunk.null_count:
                raise DatasetCorruptedError(f"{path}: null images")
            _, off_buf, data_buf = chunk.buffers()
            offsets = np.frombuffer(off_buf, dtype=np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
            if len(chunk) and not np.all(np.diff(offsets) == row):
                raise DatasetCorruptedError(f"{path}: image rows are not {row} bytes (shape {list(shape)})")
            parts.append(np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]] if len(chunk) else
                         np.empty(0, dtype=np.uint8))
        u8 = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
        x = torch.from_numpy(u8.reshape(n, *shape).astype(np.float32)) / 255.0
    else:
        col = table.column("x").combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if values.size != n * row:
            raise DatasetCorruptedError(f"{path}: point rows are not of length {row}")
        x = torch.from_numpy(values.reshape(n, *shape).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    meta["num_rows"] = n
    return PreparedData(x=x, labels=labels, meta=meta, split=table.column("split").to_pylist())


# ----------------------------------------------------------------------------------------------------
# Pixel space ↔ model space
# ----------------------------------------------------------------------------------------------------


def to_model_space(x01: torch.Tensor, centered: bool) -> torch.Tensor:
    """[0, 1] images → the model's space: unchanged (NCSN / VE) or ``2x − 1`` ∈ [−1, 1] when ``centered``
    (DDPM / VP / sub-VP, Ho et al., 2020)."""
    return x01 * 2.0 - 1.0 if centered else x01


def from_model_space(x: torch.Tensor, centered: bool) -> torch.Tensor:
    """Inverse of :func:`to_model_space`, clamped to [0, 1]."""
    x01 = (x + 1.0) / 2.0 if centered else x
    return x01.clamp(0.0, 1.0)


def to_uint8(x01: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """[0, 1] floats → uint8 ``floor(255·x + 0.5)`` after clamping to [0, 1]; a NumPy array gives a NumPy
    array. The project's one quantisation (prepared data, PNGs, FID / KID inputs)."""
    if isinstance(x01, np.ndarray):
        return np.floor(np.clip(x01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return torch.floor(x01.detach().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
