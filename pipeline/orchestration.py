"""The ``prefect:`` section of params.yaml: how the Prefect flow (:mod:`pipeline.flow`) runs the stages.

Every key is optional (:data:`CONFIG_SCHEMA`): worker count, retries with backoff, per-attempt time
limit, which stages carry the Prefect tag ``gpu``, the Markdown report published as a Prefect
artifact, and per-stage overrides keyed by stage name or fnmatch pattern (``train@*``).
``retry_delay_seconds`` is either one number, the factor of Prefect's
``exponential_backoff(backoff_factor=...)`` (b, 2b, 4b, ...), or an explicit list of delays.
Deterministic failures (exit status 2, invalid parameters) are never retried, whatever ``retries``
says (:func:`pipeline.runner.should_retry`). :meth:`OrchestrationConfig.policy` merges them into one
:class:`StagePolicy` per stage (patterns in file order, the exact stage name last: the most specific
wins). No stage lists this section in its DVC ``params``, so editing it never invalidates a stage.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from pathlib import Path
from typing import Any

from pipeline.params import Bool, Float, Int, List, Optional, ParamsError, Section, Spec, Str, _type_name


class Delays(Spec):
    """Retry delays: a list of seconds, or one number = base of an exponential backoff (b, 2b, 4b, ...)."""

    def __init__(self, default: Any = ...):
        self.default = default

    def describe(self) -> str:
        return "a number of seconds >= 0 (exponential backoff base) or a list of them"

    def validate(self, value: Any, path: str) -> Any:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            sub = f"{path}[{i}]" if isinstance(value, list) else path
            if isinstance(item, bool) or not isinstance(item, (int, float)) or item < 0:
                raise ParamsError(sub, f"expected {self.describe()}, got {item!r} ({_type_name(item)})")
        if isinstance(value, list) and not value:
            raise ParamsError(path, f"expected {self.describe()}, got an empty list")
        return [float(v) for v in value] if isinstance(value, list) else float(value)


class Patterns(Spec):
    """A mapping from stage names or fnmatch patterns (``train@*``) to a section of overrides."""

    def __init__(self, item: Section, default: Any = None):
        self.item, self.default = item, default

    def describe(self) -> str:
        return "a mapping from stage name/pattern to overrides"

    def validate(self, value: Any, path: str) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r} ({_type_name(value)})")
        return {str(k): self.item.validate(v, f"{path}.{k}") for k, v in value.items()}


STAGE_OVERRIDES = Section({
    "retries": Optional(Int(ge=0, le=50)),
    "retry_delay_seconds": Optional(Delays()),
    "retry_jitter_factor": Optional(Float(ge=0)),
    "timeout_s": Optional(Float(gt=0)),
    "gpu": Optional(Bool()),
})

#: The ``prefect:`` section of params.yaml (every key optional). No stage lists it in its DVC
#: ``params``, so changing it never invalidates a stage.
CONFIG_SCHEMA = Section({
    "max_workers": Optional(Int(ge=1)),            # null = number of CPU cores
    "retries": Int(2, ge=0, le=50),                # per stage, after the first attempt
    "retry_delay_seconds": Delays(2.0),             # a number b: exponential backoff b, 2b, 4b, ...; or a list
    "retry_jitter_factor": Optional(Float(ge=0)),
    "timeout_s": Optional(Float(gt=0)),            # wall-time limit of one attempt of a stage
    "gpu_stages": List(Str(), default=["train*", "sample*"]),  # fnmatch patterns -> Prefect tag "gpu"
    "gpu_slots": Optional(Int(ge=1)),              # also cap concurrent gpu stages inside one flow run
    "log_tail_lines": Int(40, ge=1, le=10000),     # lines of a failed stage's output in the error
    "lock_timeout_s": Float(120.0, gt=0),          # waiting for a DVC lock held by another process
    "progress_interval_s": Float(10.0, ge=0),      # at most one progress-bar log record per stage per this
    "report_markdown": Str("reports/report.md"),   # published as the flow's `scoresde-report` artifact
    "stages": Patterns(STAGE_OVERRIDES),           # per stage name / pattern overrides
})


@dataclasses.dataclass(frozen=True)
class StagePolicy:
    retries: int
    retry_delay_seconds: tuple[float, ...]   # the delays that will apply (backoff expanded)
    retry_jitter_factor: float | None
    timeout_s: float | None
    gpu: bool
    backoff_factor: float | None = None      # set when the delays are an exponential backoff

    def prefect_delays(self) -> Any:
        """``retry_delay_seconds`` for the Prefect task: ``exponential_backoff(backoff_factor=b)`` or the list."""
        if self.backoff_factor is not None:
            from prefect.tasks import exponential_backoff

            return exponential_backoff(backoff_factor=self.backoff_factor)
        return list(self.retry_delay_seconds)


@dataclasses.dataclass(frozen=True)
class OrchestrationConfig:
    values: dict

    @classmethod
    def load(cls, params_file: str | os.PathLike | None) -> "OrchestrationConfig":
        section: Any = None
        if params_file is not None and Path(params_file).exists():
            import yaml

            data = yaml.safe_load(Path(params_file).read_text()) or {}
            if not isinstance(data, dict):
                raise ParamsError("<file>", f"{params_file} must hold a mapping at the top level")
            section = data.get("prefect")
        return cls(CONFIG_SCHEMA.validate(section, "prefect"))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def policy(self, stage: str) -> StagePolicy:
        merged = {k: self.values[k] for k in ("retries", "retry_delay_seconds", "retry_jitter_factor", "timeout_s")}
        merged["gpu"] = any(fnmatch.fnmatchcase(stage, pat) for pat in self.values["gpu_stages"])
        overrides = self.values["stages"] or {}
        # Patterns first (file order), the exact stage name last: the most specific wins.
        matching = [v for k, v in overrides.items() if k != stage and fnmatch.fnmatchcase(stage, k)]
        if stage in overrides:
            matching.append(overrides[stage])
        for entry in matching:
            merged.update({k: v for k, v in entry.items() if v is not None})
        delays, factor = merged["retry_delay_seconds"], None
        if not isinstance(delays, list):  # exponential backoff from a base delay (what Prefect's helper gives)
            factor = float(delays)
            delays = [factor * 2 ** i for i in range(max(merged["retries"], 1))]
        return StagePolicy(retries=int(merged["retries"]), retry_delay_seconds=tuple(delays),
                           retry_jitter_factor=merged["retry_jitter_factor"], timeout_s=merged["timeout_s"],
                           gpu=bool(merged["gpu"]), backoff_factor=factor)
