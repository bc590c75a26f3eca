"""params.yaml loading and validation: ``python -m pipeline.params [FILE]`` checks a params file for every stage.

Every stage declares a schema for the sections of ``params.yaml`` it reads and calls
:func:`load_stage_params` before doing any work. Validation checks types, ranges, choices and
relations between fields (σ_end < σ_begin, weights summing to 1, ...), rejects unknown keys with the
closest valid name, and raises :class:`ParamsError` naming the field path (``train.ve.lr``) and what
was expected. Stage entry points turn that error into a one-line message and exit status 2, so a bad
params file never produces a traceback from deep inside torch, nor half-written outputs. A malformed
file (binary, not UTF-8, duplicated keys, YAML syntax, tabs, empty, not a mapping, over 1 MiB) is refused
the same way, naming the file (:mod:`pipeline.params_read`).

The schema language is deliberately tiny (a handful of spec classes) so that a stage's schema reads
like documentation of its params section. Each spec tree is compiled into pydantic v2 models
(:mod:`pipeline.params_model`), which do the validation and give the JSON Schema of the whole file:
``python -m pipeline.params --schema`` writes ``params.schema.json`` (editors read it through the
``# yaml-language-server: $schema=params.schema.json`` first line of params.yaml).
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = "params.yaml"
SCHEMA_FILE = "params.schema.json"


class ParamsError(ValueError):
    """A params value is missing, of the wrong type, out of range or unknown; or the file is unreadable."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"params.yaml: {path}: {message}")


# --------------------------------------------------------------------------- specs
class Spec:
    """Base class: ``validate(value, path)`` returns the checked value or raises ParamsError.

    The spec classes below are validated by the pydantic types they compile to (:mod:`pipeline.params_model`).
    A subclass defined elsewhere may override ``validate`` (it is then called from inside the pydantic
    model) and may define ``json_schema()`` for its part of the JSON Schema.
    """

    default: Any = ...  # `...` = required
    doc: str = ""       # a sentence for the JSON Schema's description

    def validate(self, value: Any, path: str) -> Any:
        from pipeline.params_model import validate

        return validate(self, value, path)

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


@dataclass
class Number(Spec):
    """A real number with optional bounds (``gt``/``ge``/``lt``/``le``); ``integer``: an int. Never a bool, NaN, inf."""

    default: Any = ...
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    integer: bool = False
    doc: str = ""

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        bounds = [f"> {self.gt}" if self.gt is not None else None,
                  f">= {self.ge}" if self.ge is not None else None,
                  f"< {self.lt}" if self.lt is not None else None,
                  f"<= {self.le}" if self.le is not None else None]
        bounds = [b for b in bounds if b]
        return kind + (" " + " and ".join(bounds) if bounds else "")


def Int(default: Any = ..., doc: str = "", **bounds) -> Number:
    return Number(default=default, integer=True, doc=doc, **bounds)


def Float(default: Any = ..., doc: str = "", **bounds) -> Number:
    return Number(default=default, doc=doc, **bounds)


@dataclass
class Bool(Spec):
    default: Any = ...
    doc: str = ""

    def describe(self) -> str:
        return "true or false"


@dataclass
class Str(Spec):
    default: Any = ...
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a full-match regular expression, described by `hint`
    hint: str = ""
    doc: str = ""

    def describe(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        return self.hint or (f"a string matching {self.pattern}" if self.pattern else "a string")


@dataclass
class OrAuto(Spec):
    """Either the literal string ``auto`` or a value of ``spec``."""

    spec: Spec = None
    default: Any = ...
    doc: str = ""

    def describe(self) -> str:
        return f"'auto' or {self.spec.describe()}"


@dataclass
class Optional(Spec):
    """``null`` or a value of ``spec``."""

    spec: Spec = None
    default: Any = None
    doc: str = ""

    def describe(self) -> str:
        return f"null or {self.spec.describe()}"


@dataclass
class List(Spec):
    item: Spec = None
    default: Any = ...
    min_len: int = 0
    max_len: int | None = None
    doc: str = ""

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"


Check = Callable[[dict], "tuple[str, str] | None"]  # returns (relative field, message) on failure


@dataclass
class Section(Spec):
    """A mapping with known keys. Unknown keys are rejected with the closest valid name.

    ``checks`` express relations between fields; each returns ``None`` or ``(field, message)`` and runs on
    the validated section (a pydantic after-model-validator).
    """

    fields: dict[str, Spec] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    default: Any = ...
    doc: str = ""

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.fields)


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
    "uri": Str("sqlite:///mlflow.db", doc="MLflow tracking URI (MLFLOW_TRACKING_URI overrides it)."),
    "timeout_s": Float(10.0, gt=0, le=600, doc="Seconds to wait for the tracking server before failing."),
    "offline_fallback": Bool(False, doc="Log to a local store when the server is unreachable, instead of failing."),
}, doc="Where the stages log their runs (MLflow); no stage's outputs depend on it.")

DEVICE = Str(pattern=r"auto|cpu|cuda(:\d+)?", hint="'auto', 'cpu', 'cuda' or 'cuda:N'")

COMMON = {
    "experiment": Str(doc="MLflow experiment of the stage runs (and of the report)."),
    "seed": Int(ge=0, doc="Seed of every random number generator of the stages."),
    "tracking": TRACKING,
    # torch's CPU threads in every stage. Fixed, because float reductions split over another number of
    # threads round differently: torch's default (the physical cores) would make the numbers depend on the
    # machine. "auto" = torch's default (faster on many cores, machine-dependent results).
    "cpu_threads": OrAuto(Int(ge=1, le=1024), default=1,
                          doc="torch CPU threads of every stage (fixed for machine-independent numbers)."),
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
    """The top-level mapping of a params file; a malformed file is a ParamsError naming it (pipeline.params_read)."""
    from pipeline.params_read import read_yaml_mapping

    return read_yaml_mapping(params_file)


_TOP_SECTIONS: dict[tuple, Section] = {}  # one compiled top-level Section per stage schema


def validate(schema: dict[str, Spec], params: dict) -> dict:
    """Validate the top-level keys named in ``schema`` (others belong to other stages)."""
    key = tuple((k, id(v)) for k, v in schema.items())
    top = _TOP_SECTIONS.get(key)
    if top is None:
        if len(_TOP_SECTIONS) > 256:
            _TOP_SECTIONS.clear()
        top = _TOP_SECTIONS[key] = Section(dict(schema))  # it references the specs: their ids stay theirs
    return top.validate({k: params[k] for k in schema if k in params}, "")


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


FLOW_SECTION = "prefect"  # read by pipeline.flow (pipeline.orchestration.CONFIG_SCHEMA), by no stage


def _flow_schema() -> Spec:
    """The ``prefect:`` section's schema. Imported by name, like the stage modules of :func:`all_schemas`: it is
    read by the flow only, so the flow's code is no dep of any stage (pipeline.deps follows static imports)."""
    import importlib

    return importlib.import_module("pipeline.orchestration").CONFIG_SCHEMA


def check_all(params_file: str | Path = PARAMS_FILE, dvc_file: str | Path = "dvc.yaml") -> list[str]:
    """Validate params.yaml against every stage's schema and the flow's ``prefect:`` section; returns the
    error messages (empty = valid)."""
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
    if FLOW_SECTION in params:
        try:
            _flow_schema().validate(params[FLOW_SECTION], FLOW_SECTION)
        except ParamsError as err:
            errors.append(f"pipeline.flow: {err}")
    # A top-level section no stage reads is a typo (`trian:`) or a leftover: say which.
    known = {key for schema in schemas.values() for key in schema} | {FLOW_SECTION}
    for key in sorted(set(params) - known, key=str):
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {sorted(known)}"
        errors.append(f"{params_file}: {key}: unknown top-level section{hint}")
    return errors


# -------------------------------------------------------------------- JSON Schema
def schema_document(dvc_file: str | Path = "dvc.yaml") -> dict:
    """JSON Schema of the whole params.yaml: every stage's sections (first declaration wins; the same spec
    objects are shared) and the flow's ``prefect:``, with descriptions naming who reads each section."""
    from pipeline.params_model import json_schema

    sections: dict[str, Spec] = {}
    readers: dict[str, list[str]] = {}
    for mod, schema in all_schemas(dvc_file).items():
        for key, spec in schema.items():
            if sections.setdefault(key, spec) is not spec and sections[key] != spec:
                raise ValueError(f"{mod} declares the section {key!r} differently from {readers[key][0]}: one params "
                                 f"file cannot follow both (declare it once, import it in both)")
            readers.setdefault(key, []).append(mod)
    flow = _flow_schema()
    sections[FLOW_SECTION] = Section(flow.fields, flow.checks, default=None, doc=flow.doc)
    n_stages = len(all_schemas(dvc_file))
    docs = {key: ("Read by every stage." if len(mods) == n_stages else f"Read by {', '.join(mods)}.")
            for key, mods in readers.items()}
    docs[FLOW_SECTION] = ("How the Prefect flow (python -m pipeline.flow) runs the stages; read by pipeline.flow "
                          "only, so editing it never invalidates a stage. Every key is optional.")
    return json_schema(sections, docs, title="params.yaml",
                       description="Parameters of the scoresde reproduction, grouped by stage. Generated by "
                                   "`python -m pipeline.params --schema` from the stages' schemas: do not edit.")


def schema_text(dvc_file: str | Path = "dvc.yaml") -> str:
    return json.dumps(schema_document(dvc_file), indent=2, ensure_ascii=False) + "\n"


def write_schema(out: str | Path = SCHEMA_FILE, dvc_file: str | Path = "dvc.yaml") -> Path:
    from scoresde.atomic import atomic_write_text

    atomic_write_text(out, schema_text(dvc_file))
    return Path(out)


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.params",
        description="Check a params file against the schema of every stage in dvc.yaml and of the Prefect flow's "
                    "`prefect:` section, or write that schema as JSON Schema. Prints one line per problem "
                    "(the field path, what was expected) and exits with status 2 when there is one, 0 when valid.")
    parser.add_argument("params_file", nargs="?", default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--dvc", default="dvc.yaml", help="dvc.yaml naming the stage modules (default: dvc.yaml)")
    parser.add_argument("--schema", nargs="?", const=SCHEMA_FILE, default=None, metavar="OUT",
                        help=f"write the JSON Schema of params.yaml to OUT (default: {SCHEMA_FILE}) and exit")
    parser.add_argument("--check-schema", nargs="?", const=SCHEMA_FILE, default=None, metavar="FILE",
                        help=f"exit 1 if FILE (default: {SCHEMA_FILE}) differs from the schema the code gives")
    args = parser.parse_args(argv)
    if args.schema:
        print(f"{write_schema(args.schema, args.dvc)} written")
        return 0
    if args.check_schema:
        current = Path(args.check_schema).read_text() if Path(args.check_schema).is_file() else None
        if current != schema_text(args.dvc):
            print(f"{args.check_schema} is out of date: run python -m pipeline.params --schema", file=sys.stderr)
            return 1
        print(f"{args.check_schema} is up to date")
        return 0
    problems = check_all(args.params_file, args.dvc)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    print(f"{args.params_file} is valid for every stage")
    return 0


if __name__ == "__main__":
    # Run as pipeline.params, not __main__: the stages' specs are instances of pipeline.params's classes.
    from pipeline.params import main as _main

    raise SystemExit(_main())
