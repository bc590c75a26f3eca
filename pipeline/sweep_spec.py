"""Sweep files (``sweeps/NAME.yaml``): parsing, validation against params.yaml and dvc.yaml, Optuna objects.

A sweep file names the params.yaml keys to vary and how, the Optuna sampler, the budget and the objective
(a number in a DVC stage's metrics file)::

    method: tpe                      # grid | random | tpe (Optuna's GridSampler / RandomSampler / TPESampler)
    seed: 0
    trials: 16
    max_parallel: 2
    params:                          # dotted params.yaml keys, one distribution each
      annealing.step_lr: {log_uniform: [1.0e-6, 1.0e-3]}
      annealing.n_steps_each: {int: [5, 20]}     # also: grid: [...], uniform: [lo, hi], choice: [...]
    base_params: {annealing.n: 64}   # optional fixed overrides (dotted keys or nested mappings)
    objective: {stage: annealing, metrics: reports/metrics/annealing.json,
                key: annealed_langevin.fid_digits_cnn_n200, direction: minimize}
    targets: [annealing]             # optional: stages each trial reproduces (default: the objective's)

Every mistake is a :class:`SweepError` (a :class:`pipeline.params.ParamsError`) naming the sweep file and the
field, raised before anything runs: :func:`parse_sweep` checks the file on its own (types, ranges, method,
budget), :func:`check_repo` checks it against the repository (every key exists in params.yaml, the merged
params pass :func:`pipeline.params.check_all` at every grid value and range end, the objective stage exists as
DVC expands dvc.yaml, its metrics file is a metrics output of that stage, some stage of the trial reads each
varied key). The objective key is checked against the metrics file the base run writes
(:func:`objective_value`), before the first trial: with ``base_params`` the metric names can differ from the
checkout's (``fid_digits_cnn_n64``).
"""
from __future__ import annotations

import difflib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.configs import deep_merge, nest
from pipeline.params import ParamsError, check_all, flatten, read_params

METHODS = ("grid", "random", "tpe")
DIRECTIONS = ("minimize", "maximize")
KINDS = ("grid", "choice", "log_uniform", "uniform", "int")
TOP_LEVEL = ("name", "description", "params", "method", "trials", "seed", "objective", "max_parallel",
             "base_params", "targets")
OBJECTIVE_FIELDS = ("stage", "metrics", "key", "direction")


class SweepError(ParamsError):
    """A sweep file is invalid: ``<file>: <field>: <what is wrong>`` (the style of ParamsError)."""

    def __init__(self, source: str, path: str, message: str):
        self.source, self.path = source, path
        ValueError.__init__(self, f"{source}: {path}: {message}")


@dataclass(frozen=True)
class Dist:
    """How one params key varies."""

    key: str
    kind: str                       # one of KINDS
    values: tuple = ()              # grid / choice
    low: float | int | None = None  # ranges (inclusive)
    high: float | int | None = None

    @property
    def log(self) -> bool:
        return self.kind == "log_uniform"

    @property
    def finite(self) -> bool:
        return self.kind in ("grid", "choice")

    def candidates(self) -> list:
        """Values that must give valid params: every grid value, both ends of a range."""
        return list(self.values) if self.finite else [self.low, self.high]

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.finite:
            return CategoricalDistribution(list(self.values))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def describe(self) -> dict:
        return {self.kind: list(self.values) if self.finite else [self.low, self.high]}


@dataclass(frozen=True)
class Objective:
    stage: str
    metrics: str | None
    key: str
    direction: str = "minimize"


@dataclass
class SweepSpec:
    name: str
    source: str
    params: dict[str, Dist]
    method: str
    trials: int
    seed: int
    objective: Objective
    max_parallel: int = 1
    base_params: dict[str, Any] = field(default_factory=dict)   # flat, dotted keys
    targets: list[str] = field(default_factory=list)
    description: str = ""

    def error(self, path: str, message: str) -> SweepError:
        return SweepError(self.source, path, message)

    @property
    def grid_size(self) -> int:
        return math.prod(len(d.values) for d in self.params.values()) if self.method == "grid" else 0

    @property
    def budget(self) -> int:
        """Trials to finish: ``trials``, at most the grid's size for a grid sweep."""
        return min(self.trials, self.grid_size) if self.method == "grid" else self.trials

    def identity(self) -> dict:
        """What defines the search (stored with the study: a restart must not silently change it)."""
        return {"method": self.method, "seed": self.seed, "params": {k: d.describe() for k, d in self.params.items()},
                "objective": vars(self.objective), "base_params": self.base_params, "targets": self.targets}

    def overlay(self, values: dict[str, Any] | None = None) -> dict:
        """Nested params overlay: ``base_params`` then ``values`` (dotted keys)."""
        return nest({**self.base_params, **(values or {})})


# ------------------------------------------------------------------------------------ helpers
def lookup(data: dict, key: str) -> Any:
    """The value at a dotted key; KeyError if absent."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def all_keys(data: dict, prefix: str = "") -> list[str]:
    """Every dotted path of a nested mapping (leaves and sections)."""
    out = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.append(path)
        if isinstance(value, dict):
            out += all_keys(value, path)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _close(word: str, options: list[str]) -> str:
    found = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean {found[0]!r}?" if found else ""


# ------------------------------------------------------------------------------------- parsing
def _parse_dist(source: str, key: str, raw: Any) -> Dist:
    path = f"params.{key}"
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SweepError(source, path, f"expected a mapping with one of {list(KINDS)}, e.g. {{grid: [1, 2]}}; "
                                       f"got {raw!r}")
    kind, arg = next(iter(raw.items()))
    if kind not in KINDS:
        raise SweepError(source, f"{path}.{kind}", f"unknown distribution{_close(str(kind), list(KINDS))} "
                                                    f"(expected one of {list(KINDS)})")
    path = f"{path}.{kind}"
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise SweepError(source, path, f"expected a non-empty list of values, got {arg!r}")
        for v in arg:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise SweepError(source, path, f"values must be numbers, strings, booleans or null, got {v!r}")
        if len({repr(v) for v in arg}) != len(arg):
            raise SweepError(source, path, f"repeated values in {arg!r}")
        return Dist(key, kind, values=tuple(arg))
    if not isinstance(arg, list) or len(arg) != 2 or not all(_is_number(v) for v in arg):
        raise SweepError(source, path, f"expected [low, high] (two finite numbers), got {arg!r}")
    low, high = arg
    if kind == "int":
        if not all(isinstance(v, int) for v in arg):
            raise SweepError(source, path, f"expected two integers, got {arg!r}")
    else:
        low, high = float(low), float(high)
    if not low < high:
        raise SweepError(source, path, f"empty or inverted range: low {low!r} must be < high {high!r}")
    if kind == "log_uniform" and low <= 0:
        raise SweepError(source, path, f"a log range needs low > 0, got {low!r}")
    return Dist(key, kind, low=low, high=high)


def _int_field(source: str, data: dict, key: str, default: Any, minimum: int) -> int:
    value = data.get(key, default)
    if value is ...:
        raise SweepError(source, key, f"missing (expected an integer >= {minimum})")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SweepError(source, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def parse_sweep(path: str | Path, *, trials: int | None = None, max_parallel: int | None = None,
                source: str | None = None) -> SweepSpec:
    """Read and check a sweep file on its own (no repository needed); CLI overrides for trials / max_parallel.

    ``source``: how error messages name the file (default: ``path``)."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise SweepError(source, "<file>", "sweep file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(source, "<file>", f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SweepError(source, "<file>", "expected a mapping at the top level")
    for key in data:
        if key not in TOP_LEVEL:
            raise SweepError(source, str(key), f"unknown field{_close(str(key), list(TOP_LEVEL))} "
                                               f"(valid: {', '.join(TOP_LEVEL)})")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise SweepError(source, "name", f"expected a name of letters, digits, '-', '_' or '.', got {name!r}")
    method = data.get("method")
    if method not in METHODS:
        raise SweepError(source, "method", f"unknown method {method!r}{_close(str(method), list(METHODS))} "
                                           f"(expected one of {list(METHODS)})")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise SweepError(source, "params", "expected a non-empty mapping of dotted params.yaml keys to distributions")
    params = {str(k): _parse_dist(source, str(k), v) for k, v in raw.items()}
    if method == "grid":
        for key, dist in params.items():
            if not dist.finite:
                raise SweepError(source, f"params.{key}.{dist.kind}",
                                 "method grid needs a finite set of values: use grid: [...] (or method random/tpe)")
    n_trials = trials if trials is not None else _int_field(source, data, "trials", ..., 1)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise SweepError(source, "trials", f"expected an integer >= 1, got {n_trials!r}")
    seed = _int_field(source, data, "seed", 0, 0)
    parallel = max_parallel if max_parallel is not None else _int_field(source, data, "max_parallel", 1, 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise SweepError(source, "max_parallel", f"expected an integer >= 1, got {parallel!r}")
    objective = _parse_objective(source, data.get("objective"))
    base = data.get("base_params") or {}
    if not isinstance(base, dict):
        raise SweepError(source, "base_params", f"expected a mapping of params.yaml keys to values, got {base!r}")
    base_flat = flatten(base)
    for key in base_flat:
        if key in params:
            raise SweepError(source, f"base_params.{key}", "also varied under params: fix it in one place only")
    targets = data.get("targets", [objective.stage])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise SweepError(source, "targets", f"expected a non-empty list of DVC stage names, got {targets!r}")
    description = data.get("description", "")
    return SweepSpec(name=name, source=source, params=params, method=method, trials=n_trials, seed=seed,
                     objective=objective, max_parallel=parallel, base_params=base_flat, targets=list(targets),
                     description=str(description or ""))


def _parse_objective(source: str, raw: Any) -> Objective:
    if not isinstance(raw, dict):
        raise SweepError(source, "objective", "expected a mapping with stage, metrics, key, direction")
    for key in raw:
        if key not in OBJECTIVE_FIELDS:
            raise SweepError(source, f"objective.{key}", f"unknown field{_close(str(key), list(OBJECTIVE_FIELDS))} "
                                                         f"(valid: {', '.join(OBJECTIVE_FIELDS)})")
    for key in ("stage", "key"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise SweepError(source, f"objective.{key}", f"missing (expected a string), got {raw.get(key)!r}")
    metrics = raw.get("metrics")
    if metrics is not None and (not isinstance(metrics, str) or not metrics):
        raise SweepError(source, "objective.metrics", f"expected the path of a metrics file, got {metrics!r}")
    direction = raw.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise SweepError(source, "objective.direction", f"expected one of {list(DIRECTIONS)}, got {direction!r}")
    return Objective(raw["stage"], metrics, raw["key"], direction)


# --------------------------------------------------------------------------- repository checks
@dataclass
class RepoInfo:
    """What the driver needs to know about the repository, found while checking the sweep."""

    params: dict                     # the checkout's params.yaml
    defaults: dict[str, Any]         # varied key -> value in params.yaml (+ base_params)
    closure: list[str]               # stages `dvc repro <targets>` walks, dependencies first
    rerun: list[str]                 # of those, the stages a trial re-runs (they read a varied key, or follow one)
    metrics: str                     # the objective's metrics file (relative to the root)
    outs: list[str]                  # every output path of the pipeline (left out of the trial copies)
    closure_outs: list[str]          # outputs of the stages in ``closure`` (copied from the base run)
    cached_outs: dict[str, list[str]]  # stage -> its outputs kept in the DVC cache
    uncached_outs: dict[str, list[str]]  # stage -> its outputs with cache: false (metrics, plots, figures)
    cache_dir: Path                  # the checkout's DVC cache (shared by every workspace)


def _stage_details(root: Path) -> tuple[dict[str, dict[str, list[str]]], Path]:
    """{stage: {"metrics": [paths], "params": [keys of params.yaml], "cached" / "uncached": [outs in the cache /
    not]}} from DVC's own index, and the repository's cache directory."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from pipeline.dvcgraph import working_directory

    details: dict[str, dict[str, list[str]]] = {}
    with working_directory(root), Repo(str(root)) as repo:
        for stage in repo.index.stages:
            params: list[str] = []
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency) and Path(dep.fs_path).name == "params.yaml":
                    params += list(dep.params) or ["*"]
            metrics = [os.path.relpath(str(o.fs_path), root) for o in stage.outs if o.metric]
            cached = [os.path.relpath(str(o.fs_path), root) for o in stage.outs if o.use_cache]
            uncached = [os.path.relpath(str(o.fs_path), root) for o in stage.outs if not o.use_cache]
            details[stage.addressing] = {"metrics": metrics, "params": params, "cached": cached, "uncached": uncached}
        cache_dir = Path(repo.cache.legacy.path).resolve()
    return details, cache_dir


def _reads(declared: list[str], key: str) -> bool:
    return any(p == "*" or key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in declared)


def _validate_params(spec: SweepSpec, params: dict, root: Path) -> None:
    known = all_keys(params)
    leaves = list(flatten(params))
    for section, keys in (("base_params", spec.base_params), ("params", spec.params)):
        for key in keys:
            try:
                lookup(params, key)
            except KeyError:
                raise spec.error(f"{section}.{key}", f"unknown params.yaml key{_close(key, leaves or known)}") from None
    checks = [({}, "base_params")] if spec.base_params else []
    checks += [({key: v}, f"params.{key}") for key, d in spec.params.items() for v in d.candidates()]
    fd, tmp = tempfile.mkstemp(prefix="sweep-check.", suffix=".yaml")  # not in the checkout: others may be looking
    os.close(fd)
    try:
        for values, where in checks:
            merged = deep_merge(params, spec.overlay(values))
            Path(tmp).write_text(yaml.safe_dump(merged, sort_keys=False))
            problems = check_all(tmp, root / "dvc.yaml")
            if problems:
                shown = ", ".join(f"{k} = {v!r}" for k, v in values.items()) or "base_params"
                raise spec.error(where, f"{shown} gives invalid params: "
                                 + "; ".join(p.replace(tmp, "params.yaml") for p in problems))
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_repo(spec: SweepSpec, root: str | Path, params_file: str | Path | None = None) -> RepoInfo:
    """Check ``spec`` against the repository at ``root`` (see the module docstring); nothing runs."""
    from pipeline.dvcgraph import load_pipeline

    root = Path(root).resolve()
    params = read_params(params_file or root / "params.yaml")
    _validate_params(spec, params, root)
    pipeline = load_pipeline(root)
    names = list(pipeline.stages)
    groups = sorted({n.split("@")[0] for n in names if "@" in n})
    if spec.objective.stage not in pipeline.stages:
        raise spec.error("objective.stage", f"no stage {spec.objective.stage!r} in dvc.yaml"
                                            f"{_close(spec.objective.stage, names)} (stages: {', '.join(names)})")
    selected: set[str] = set()
    for i, target in enumerate(spec.targets):
        match = [target] if target in pipeline.stages else [n for n in names if n.split("@")[0] == target]
        if not match:
            raise spec.error(f"targets[{i}]", f"no stage {target!r} in dvc.yaml{_close(target, names + groups)}")
        selected.update(match)
    closure, todo = set(), list(selected)
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(pipeline.stages[name].upstream)
    if spec.objective.stage not in closure:
        raise spec.error("targets", f"{spec.targets} do not reproduce the objective's stage {spec.objective.stage!r}")
    details, cache_dir = _stage_details(root)
    metrics_outs = details.get(spec.objective.stage, {}).get("metrics", [])
    metrics = spec.objective.metrics
    if metrics is None:
        if len(metrics_outs) != 1:
            raise spec.error("objective.metrics", f"stage {spec.objective.stage!r} has metrics outputs {metrics_outs}: "
                                                  "name one")
        metrics = metrics_outs[0]
    elif os.path.normpath(metrics) not in [os.path.normpath(m) for m in metrics_outs]:
        raise spec.error("objective.metrics", f"{metrics!r} is not a metrics output of stage "
                                              f"{spec.objective.stage!r} (its metrics: {metrics_outs or 'none'})")
    order = [n for n in names if n in closure]
    reading = {n for n in order if any(_reads(details.get(n, {}).get("params", []), k) for k in spec.params)}
    for key in spec.params:
        if not any(_reads(details.get(n, {}).get("params", []), key) for n in order):
            raise spec.error(f"params.{key}", f"no stage of the trial ({', '.join(order)}) reads this key: "
                                              "varying it would change nothing")
    rerun = set(reading)
    for name in reading:
        rerun |= pipeline.downstream(name) & closure
    base = deep_merge(params, spec.overlay())
    outs = sorted({o for s in pipeline.stages.values() for o in s.outs})
    return RepoInfo(params=params, defaults={k: lookup(base, k) for k in spec.params}, closure=order,
                    rerun=[n for n in order if n in rerun], metrics=metrics, outs=outs,
                    closure_outs=sorted({o for n in order for o in pipeline.stages[n].outs}),
                    cached_outs={n: d["cached"] for n, d in details.items()},
                    uncached_outs={n: d["uncached"] for n, d in details.items()}, cache_dir=cache_dir)


def objective_value(spec: SweepSpec, metrics: dict, where: str) -> tuple[float, dict]:
    """The objective in a metrics dict and the numbers beside it (``nfe``, ``kid_std…``); SweepError if absent."""
    try:
        value = lookup(metrics, spec.objective.key)
    except KeyError:
        available = [k for k, v in flatten(metrics).items() if _is_number(v)]
        raise spec.error("objective.key", f"{spec.objective.key!r} is not in {where}"
                                          f"{_close(spec.objective.key, available)} (numbers there: "
                                          f"{', '.join(available[:12])}{' ...' if len(available) > 12 else ''})") from None
    if not _is_number(value):
        raise spec.error("objective.key", f"{spec.objective.key!r} in {where} is {value!r}, not a finite number")
    parent = spec.objective.key.rpartition(".")[0]
    context = lookup(metrics, parent) if parent else metrics
    return float(value), {k: v for k, v in context.items() if _is_number(v)}
