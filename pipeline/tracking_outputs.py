"""What a stage declares in dvc.yaml, read for MLflow: its outputs (PNG -> keyed images, CSV / Parquet ->
tables) and the prepared dataset as a run input.

:func:`declared_outputs` reads dvc.yaml itself (``outs``, ``metrics``, ``plots`` of a stage; ``foreach``
items substituted for ``${item}`` / ``${key}``, top-level ``vars`` for ``${name}``), which takes
milliseconds where DVC's own index takes seconds; a stage the file does not describe has no outputs here.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

MAX_TABLE_ROWS = 10_000
MAX_TABLE_BYTES = 50 * 2**20
_VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.]+)\s*\}")


def _substitute(text: str, values: dict[str, Any]) -> str | None:
    missing = False

    def repl(match: re.Match) -> str:
        nonlocal missing
        key = match.group(1)
        if key in values and not isinstance(values[key], (dict, list)):
            return str(values[key])
        missing = True
        return match.group(0)

    out = _VAR.sub(repl, text)
    return None if missing else out


def _paths(entries: list | None) -> list[str]:
    out = []
    for entry in entries or []:
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, dict):
            out.extend(str(k) for k in entry)
    return out


def declared_outputs(dvc_stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """Paths of the ``outs``, ``metrics`` and ``plots`` of ``dvc_stage`` (``train@ve``) in ``dvc_yaml``."""
    import yaml

    path = Path(dvc_yaml)
    if ":" in dvc_stage or not path.exists():
        return []
    doc = yaml.safe_load(path.read_text()) or {}
    values: dict[str, Any] = {}
    for entry in doc.get("vars") or []:
        if isinstance(entry, dict):
            values.update(entry)
    name, _, item = dvc_stage.partition("@")
    stage = (doc.get("stages") or {}).get(name)
    if not isinstance(stage, dict):
        return []
    if "foreach" in stage:
        if not item:
            return []
        body = stage.get("do") or {}
        foreach = stage["foreach"]
        if isinstance(foreach, dict):
            value = foreach.get(item)
            values.update(key=item, item=value)
            if isinstance(value, dict):
                values.update({f"item.{k}": v for k, v in value.items()})
        else:
            values["item"] = item
    else:
        body = stage
    found = []
    for section in ("outs", "metrics", "plots"):
        for raw in _paths(body.get(section)):
            resolved = _substitute(raw, values)
            if resolved is not None and resolved not in found:
                found.append(resolved)
    return found


def _scalar_parquet_columns(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    ok = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string,
          pa.types.is_large_string, pa.types.is_timestamp, pa.types.is_date, pa.types.is_dictionary)
    return [f.name for f in schema if any(test(f.type) for test in ok)]


def read_table(path: str | Path):
    """The scalar columns of a CSV / Parquet file as a DataFrame (at most ``MAX_TABLE_ROWS`` rows), or None."""
    import pandas as pd

    path = Path(path)
    if not path.exists() or path.stat().st_size > MAX_TABLE_BYTES:
        return None
    if path.suffix.lower() == ".parquet":
        columns = _scalar_parquet_columns(path)
        if not columns:
            return None
        df = pd.read_parquet(path, columns=columns)
    else:
        df = pd.read_csv(path)
    return df.head(MAX_TABLE_ROWS) if len(df.columns) else None


def file_md5(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_input(path: str | Path, name: str | None = None, context: str = "training"):
    """An MLflow ``DatasetInput`` for a Parquet / CSV dataset file (digest = the file's md5, as DVC's)."""
    import warnings

    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    path = Path(path)
    if not path.exists():
        return None
    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    with warnings.catch_warnings():  # source-kind ambiguity and integer-column schema hints
        warnings.simplefilter("ignore")
        dataset = mlflow.data.from_pandas(df, source=path.as_posix(), name=name or path.stem, digest=file_md5(path))
        entity = dataset._to_mlflow_entity()
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])
