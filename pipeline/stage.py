"""What every stage entry point shares: params validation first, tracking check, then the stage's body.

A stage module defines ``SCHEMA`` (the params sections it reads, see :mod:`pipeline.params`) and a
``run(params, run, args)`` body, and ends with ``main = stage_main("name", SCHEMA, run)``. The order
matters to users: a bad params file or an unreachable tracking server fails in seconds, before any
data is read or any output is touched. Files are written through :mod:`pipeline.io` (atomic).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline.env import TRACKING_OFF, is_rank_zero, tracking_disabled
from pipeline.params import ParamsError, Spec, load_stage_params

__all__ = ["stage_main", "is_rank_zero"]


def _description(body: Callable) -> str | None:
    module = sys.modules.get(body.__module__)
    return (module.__doc__ or "").strip() or None if module else None


def stage_main(stage: str, schema: dict[str, Spec], body: Callable[..., None], *,
               sde_choices: tuple[str, ...] | None = None,
               extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> Callable[[list[str] | None], int]:
    """Build the ``main(argv)`` of a stage: parse args, validate params, check tracking, run the body.

    A foreach stage is named ``<stage>@<item>`` after its item argument (``--sde`` or the first extra one,
    e.g. ``--sigma-end``), as DVC names it.
    """

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=_description(body),
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        if sde_choices:
            parser.add_argument("--sde", required=True, choices=sde_choices, help="the model kind")
        parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        if extra_args:
            extra_args(parser)
        args = parser.parse_args(argv)
        item = getattr(args, "sde", None) or getattr(args, "sigma_end", None)
        name = f"{stage}@{item}" if item is not None else stage
        try:
            params = load_stage_params(schema, args.params)
        except ParamsError as err:
            print(f"[{name}] invalid parameters: {err}", file=sys.stderr)
            return 2
        if params.get("cpu_threads", "auto") == "auto":
            return _run(name, params, body, args)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(params["cpu_threads"])
        try:
            return _run(name, params, body, args)
        finally:  # a stage called in-process (tests, notebooks) leaves the caller's thread count as it was
            torch.set_num_threads(before)

    return main


def _run(name: str, params: dict, body: Callable[..., None], args: argparse.Namespace) -> int:
    """Tracking check, then the body; exit status 1 (tracking, or an expected error of the library: one line
    ``stage <name>: <message>``, no traceback) or 2 (params found invalid against the data)."""
    from pipeline.tracking import NullRun, TrackingUnavailable, configure, stage_run

    try:
        if not is_rank_zero():  # under torchrun only rank 0 tracks and writes outputs
            body(params, NullRun(), args)
            return 0
        if tracking_disabled():  # a machine without MLflow (e.g. a bare GPU node): outputs only
            print(f"[{name}] {TRACKING_OFF}={os.environ[TRACKING_OFF]}: not logging to MLflow", file=sys.stderr)
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
    except Exception as err:  # noqa: BLE001 - only the library's expected errors end here; others re-raise
        if not _expected(err):
            raise  # a bug: its traceback is what a developer needs
        print(f"stage {name}: {err}", file=sys.stderr)
        return 1
    return 0


#: The library's expected errors, by module: a user can fix each from its message (missing dataset files and
#: where to put them, a corrupt checkpoint, a diverged training run, a stop by signal after a checkpoint).
EXPECTED_ERRORS = {
    "scoresde.atomic": ("DiskFullError",),  # "no space left on device writing <path>"
    "scoresde.data": ("DatasetError",),  # DatasetNotFoundError, DatasetCorruptedError
    "scoresde.checkpoint": ("CheckpointError",),  # CorruptCheckpointError, UnsafeCheckpointError
    "scoresde.training": ("NonFiniteLossError", "TrainingInterrupted"),
    "pipeline.fidelity": ("UnsafeWeightsError",),
}


def _expected(err: BaseException) -> bool:
    """Is ``err`` one of :data:`EXPECTED_ERRORS`? Looked up in the modules already imported (an exception of a
    class can only exist once its module is), so the harness imports no torch for it."""
    for module, names in EXPECTED_ERRORS.items():
        mod = sys.modules.get(module)
        if mod is not None and isinstance(err, tuple(getattr(mod, n) for n in names if hasattr(mod, n))):
            return True
    return False
