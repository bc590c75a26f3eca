"""params.yaml loading and validation.

Every stage declares a schema for the sections of ``params.yaml`` it reads and calls
:func:`load_stage_params` before doing any work. Validation checks types, ranges, choices and
relations between fields (σ_end < σ_begin, weights summing to 1, ...), rejects unknown keys with the
closest valid name, and raises :class:`ParamsError` naming the field path (``train.ve.lr``) and what
was expected. Stage entry points turn that error into a one-line message and exit status 2, so a bad
params file never produces a traceback from deep inside torch, nor half-written outputs.

The schema language is deliberately tiny (a handful of spec classes) so that a stage's schema reads
like documentation of its params section.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params value is missing, of the wrong type, out of range or unknown."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"params.yaml: {path}: {message}")


# --------------------------------------------------------------------------- specs
class Spec:
    """Base class: ``validate(value, path)`` returns the checked value or raises ParamsError."""

    default: Any = ...  # `...` = required

    def validate(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class Number(Spec):
    """A real number with optional bounds (``gt``/``ge``/``lt``/``le``)."""

    default: Any = ...
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = [f"> {self.gt}" if self.gt is not None else None,
                  f">= {self.ge}" if self.ge is not None else None,
                  f"< {self.lt}" if self.lt is not None else None,
                  f"<= {self.le}" if self.le is not None else None]
        bounds = [b for b in bounds if b]
        return kind + (" " + " and ".join(bounds) if bounds else "")

    def validate(self, value: Any, path: str) -> Any:
        # bool is an int subclass in Python; `lr: true` is a mistake, not 1.
        ok_types = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_types):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r} ({_type_name(value)})")
        if not self.integer:
            value = float(value)
            if not math.isfinite(value):
                raise ParamsError(path, f"expected a finite number, got {value!r}")
        for bound, op, ok in ((self.gt, ">", lambda v, b: v > b), (self.ge, ">=", lambda v, b: v >= b),
                              (self.lt, "<", lambda v, b: v < b), (self.le, "<=", lambda v, b: v <= b)):
            if bound is not None and not ok(value, bound):
                raise ParamsError(path, f"expected {self.describe()}, got {value!r}")
        return value


def Int(default: Any = ..., **bounds) -> Number:
    return Number(default=default, integer=True, **bounds)


def Float(default: Any = ..., **bounds) -> Number:
    return Number(default=default, **bounds)


@dataclass
class Bool(Spec):
    default: Any = ...

    def describe(self) -> str:
        return "true or false"

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise ParamsError(path, f"expected true or false, got {value!r} ({_type_name(value)})")
        return value


@dataclass
class Str(Spec):
    default: Any = ...
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a full-match regular expression, described by `hint`
    hint: str = ""

    def describe(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        return self.hint or (f"a string matching {self.pattern}" if self.pattern else "a string")

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r} ({_type_name(value)})")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r}")
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ParamsError(path, f"expected one of {list(self.choices)}, got {value!r}{hint}")
        return value


@dataclass
class OrAuto(Spec):
    """Either the literal string ``auto`` or a value of ``spec``."""

    spec: Spec = None
    default: Any = ...

    def describe(self) -> str:
        return f"'auto' or {self.spec.describe()}"

    def validate(self, value: Any, path: str) -> Any:
        if value == "auto":
            return value
        try:
            return self.spec.validate(value, path)
        except ParamsError:
            raise ParamsError(path, f"expected {self.describe()}, got {value!r}") from None


@dataclass
class Optional(Spec):
    """``null`` or a value of ``spec``."""

    spec: Spec = None
    default: Any = None

    def describe(self) -> str:
        return f"null or {self.spec.describe()}"

    def validate(self, value: Any, path: str) -> Any:
        return None if value is None else self.spec.validate(value, path)


@dataclass
class List(Spec):
    item: Spec = None
    default: Any = ...
    min_len: int = 0
    max_len: int | None = None

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"

    def validate(self, value: Any, path: str) -> Any:
        if not isinstance(value, list):
            raise ParamsError(path, f"expected {self.describe()}, got {value!r} ({_type_name(value)})")
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            want = f"{self.min_len}..{self.max_len}" if self.max_len is not None else f">= {self.min_len}"
            raise ParamsError(path, f"expected a list of length {want}, got {len(value)} items")
        return [self.item.validate(v, f"{path}[{i}]") for i, v in enumerate(value)]


Check = Callable[[dict], "tuple[str, str] | None"]  # returns (relative field, message) on failure


@dataclass
class Section(Spec):
    """A mapping with known keys. Unknown keys are rejected with the closest valid name.

    ``checks`` express relations between fields; each returns ``None`` or ``(field, message)``.
    """

    fields: dict[str, Spec] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    default: Any = ...

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.fields)

    def validate(self, value: Any, path: str) -> dict:
        if value is None and all(s.default is not ... for s in self.fields.values()):
            value = {}
        if not isinstance(value, dict):
            raise ParamsError(path, f"expected a mapping, got {value!r} ({_type_name(value)})")
        for key in value:
            if key not in self.fields:
                close = difflib.get_close_matches(str(key), list(self.fields), n=1, cutoff=0.5)
                hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
                raise ParamsError(_join(path, key), f"unknown key{hint} (valid keys: {', '.join(self.fields)})")
        out = {}
        for key, spec in self.fields.items():
            sub = _join(path, key)
            if key in value:
                out[key] = spec.validate(value[key], sub)
            elif spec.default is ...:
                raise ParamsError(sub, f"missing (expected {spec.describe()})")
            else:
                out[key] = spec.validate(spec.default, sub) if isinstance(spec, Section) else spec.default
        for check in self.checks:
            failure = check(out)
            if failure:
                rel, message = failure
                raise ParamsError(_join(path, rel), message)
        return out


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ------------------------------------------------------------------ shared pieces
def sums_to_one(key: str) -> Check:
    def check(d: dict):
        total = sum(d[key])
        if abs(total - 1.0) > 1e-6:
            return key, f"expected weights summing to 1, got sum {total:g}"
        return None
    return check


def less_than(small: str, big: str) -> Check:
    def check(d: dict):
        a, b = d[small], d[big]
        if a != "auto" and b != "auto" and a is not None and b is not None and not a < b:
            return small, f"expected {small} < {big}, got {a} >= {b}"
        return None
    return check


TRACKING = Section({
    "uri": Str("sqlite:///mlflow.db"),
    "timeout_s": Float(10.0, gt=0, le=600),
    "offline_fallback": Bool(False),
})

DEVICE = Str(pattern=r"auto|cpu|cuda(:\d+)?", hint="'auto', 'cpu', 'cuda' or 'cuda:N'")

COMMON = {
    "experiment": Str(),
    "seed": Int(ge=0),
    "tracking": TRACKING,
    # torch's CPU threads in every stage. Fixed, because float reductions split over another number of
    # threads round differently: torch's default (the physical cores) would make the numbers depend on the
    # machine. "auto" = torch's default (faster on many cores, machine-dependent results).
    "cpu_threads": OrAuto(Int(ge=1, le=1024), default=1),
}


# ----------------------------------------------------------------------- loading
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted names of params (``train.ve.lr``); lists and empty
    mappings are leaves."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def read_params(params_file: str | Path = PARAMS_FILE) -> dict:
    path = Path(params_file)
    if not path.exists():
        raise ParamsError("<file>", f"{path} not found (run from the repository root)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError("<file>", f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ParamsError("<file>", f"{path} must hold a mapping at the top level")
    return data


def validate(schema: dict[str, Spec], params: dict) -> dict:
    """Validate the top-level keys named in ``schema`` (others belong to other stages)."""
    return Section(schema).validate({k: params[k] for k in schema if k in params}, "")


def load_stage_params(schema: dict[str, Spec], params_file: str | Path = PARAMS_FILE) -> dict:
    """Read ``params.yaml`` and validate the sections in ``schema``; the resolved dict is returned."""
    return validate(schema, read_params(params_file))


def exit_on_params_error(err: ParamsError, stage: str) -> None:
    print(f"[{stage}] invalid parameters: {err}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------- all stages at once
def stage_modules(dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """Modules of the stage commands in dvc.yaml (``python -m stages.train --sde …`` -> ``stages.train``)."""
    stages = (yaml.safe_load(Path(dvc_file).read_text()) or {}).get("stages", {})
    mods = []
    for stage in stages.values():
        cmd = (stage.get("do") or stage).get("cmd", "")
        cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
        parts = cmd.split()
        if "-m" in parts:
            mod = parts[parts.index("-m") + 1]
            if mod not in mods:
                mods.append(mod)
    return mods


def all_schemas(dvc_file: str | Path = "dvc.yaml") -> dict[str, dict[str, Spec]]:
    """{module: SCHEMA} for every stage module named in dvc.yaml."""
    import importlib

    return {mod: importlib.import_module(mod).SCHEMA for mod in stage_modules(dvc_file)}


def check_all(params_file: str | Path = PARAMS_FILE, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """Validate params.yaml against every stage's schema; returns the error messages (empty = valid)."""
    errors = []
    try:
        params = read_params(params_file)
    except ParamsError as err:
        return [str(err)]
    schemas = all_schemas(dvc_file)
    for mod, schema in schemas.items():
        try:
            validate(schema, params)
        except ParamsError as err:
            errors.append(f"{mod}: {err}")
    # A top-level section no stage reads is a typo (`trian:`) or a leftover: say which.
    known = {key for schema in schemas.values() for key in schema} | {"prefect"}  # prefect: read by pipeline.flow
    for key in sorted(set(params) - known):
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(known)}"
        errors.append(f"{params_file}: {key}: unknown top-level section{hint}")
    return errors


if __name__ == "__main__":
    problems = check_all(sys.argv[1] if len(sys.argv) > 1 else PARAMS_FILE)
    print("\n".join(problems) or "params.yaml is valid for every stage")
    raise SystemExit(2 if problems else 0)
