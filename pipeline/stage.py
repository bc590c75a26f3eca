"""What every stage entry point shares: params validation first, tracking check, atomic outputs.

A stage module defines ``SCHEMA`` (the params sections it reads, see :mod:`pipeline.params`) and a
``run(params, run, args)`` body, and ends with ``main = stage_main("name", SCHEMA, run)``. The order
matters to users: a bad params file or an unreachable tracking server fails in seconds, before any
data is read or any output is touched.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.params import ParamsError, Spec, load_stage_params


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that produces it first (dvc repro)")
    return json.loads(path.read_text())


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


TRACKING_OFF_ENV = "SCORESDE_TRACKING"


def tracking_disabled() -> bool:
    """``SCORESDE_TRACKING=off`` runs stages without MLflow (outputs and DVC records only)."""
    return os.environ.get(TRACKING_OFF_ENV, "").strip().lower() in {"off", "0", "false", "none"}


def stage_main(stage: str, schema: dict[str, Spec], body: Callable[..., None], *,
               sde_choices: tuple[str, ...] | None = None, extra_args: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> Callable[[list[str] | None], int]:
    """Build the ``main(argv)`` of a stage: parse args, validate params, check tracking, run the body."""

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
        if sde_choices:
            parser.add_argument("--sde", required=True, choices=sde_choices)
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if extra_args:
            extra_args(parser)
        args = parser.parse_args(argv)
        name = f"{stage}@{args.sde}" if sde_choices else stage
        try:
            params = load_stage_params(schema, args.params)
        except ParamsError as err:
            print(f"[{name}] invalid parameters: {err}", file=sys.stderr)
            return 2
        from pipeline.tracking import NullRun, TrackingUnavailable, configure, stage_run

        try:
            if not is_rank_zero():  # under torchrun only rank 0 tracks and writes outputs
                body(params, NullRun(), args)
                return 0
            if tracking_disabled():  # a machine without MLflow (e.g. a bare GPU node): outputs only
                print(f"[{name}] {TRACKING_OFF_ENV}={os.environ[TRACKING_OFF_ENV]}: not logging to MLflow",
                      file=sys.stderr)
                body(params, NullRun(), args)
                return 0
            configure(params.get("tracking"))
            with stage_run(name, params, sde=getattr(args, "sde", None)) as run:
                body(params, run, args)
        except TrackingUnavailable as err:
            print(f"[{name}] {err}", file=sys.stderr)
            return 1
        except ParamsError as err:  # relations only checkable against the data (e.g. σ_end < auto σ_begin)
            print(f"[{name}] invalid parameters: {err}", file=sys.stderr)
            return 2
        return 0

    return main
