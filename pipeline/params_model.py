"""The params schema language of :mod:`pipeline.params`, compiled into pydantic v2 models.

Sections are declared with the small spec classes of :mod:`pipeline.params` (``Section``, ``Int``,
``Str(choices=...)``, ...); this module turns each spec tree into pydantic types, which do the validation
and produce the JSON Schema (:func:`json_schema`):

- ``Number`` -> ``int`` / ``float`` with ``gt``/``ge``/``lt``/``le`` (strict: ``true`` is not 1, ``"1e-3"`` is
  not a number; floats must be finite); ``Bool`` -> strict ``bool``; ``Str`` -> ``Literal[choices]`` or a
  ``str`` with a full-match ``pattern``; ``Optional`` -> ``X | None``; ``OrAuto`` -> ``Literal["auto"] | X``;
  ``List`` -> ``list[X]`` with length bounds;
- ``Section`` -> a model (``pydantic.create_model``) with ``extra="forbid"``, one aliased field per key and an
  after-``model_validator`` running the section's cross-field ``checks``;
- a ``Spec`` subclass this module does not know (e.g. ``pipeline.orchestration.Delays``) is kept as a
  validator function around its own ``validate``; its JSON Schema is its ``json_schema()`` when it has
  one, else just its description.

A pydantic ``ValidationError`` becomes one :class:`~pipeline.params.ParamsError`: the error's location is
walked down the spec tree to the dotted field path (``train.ve.lr``, ``samplers.run[1]``) and the message
is written from the spec (``expected a number > 0 and <= 1, got -1.0``), with "did you mean" for unknown
keys and mistyped choices, as before pydantic.
"""
from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from pydantic import create_model, model_validator
from pydantic_core import PydanticCustomError

from pipeline import params as P

CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, regex_engine="python-re",
                    protected_namespaces=(), populate_by_name=False)
_MISSING = object()


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _all_defaults(section: "P.Section") -> bool:
    return all(s.default is not ... for s in section.fields.values())


# ------------------------------------------------------------------------------------- compiling
class Compiler:
    """Spec -> pydantic annotation. ``cache_on_specs``: keep each Section's model on it (validation); else a fresh
    set of models with unique names from their first path (the JSON Schema)."""

    def __init__(self, cache_on_specs: bool = True):
        self.cache_on_specs = cache_on_specs
        self.models: dict[int, tuple[P.Section, type[BaseModel]]] = {}
        self.names: set[str] = set()

    # a Section's model is cached on the Section itself for validation (dataclass fields are untouched)
    def model(self, section: "P.Section", path: str = "") -> type[BaseModel]:
        if self.cache_on_specs:
            cached = section.__dict__.get("_pydantic_model")
            if cached is not None:
                return cached
        elif id(section) in self.models:
            return self.models[id(section)][1]
        model = self._build(section, path)
        if self.cache_on_specs:
            section.__dict__["_pydantic_model"] = model
        else:
            self.models[id(section)] = (section, model)  # the reference keeps id() unique
        return model

    def _name(self, path: str) -> str:
        base = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", path) if part) or "Params"
        name, i = base, 2
        while name in self.names:
            name, i = f"{base}{i}", i + 1
        self.names.add(name)
        return name

    def _build(self, section: "P.Section", path: str) -> type[BaseModel]:
        fields = {}
        for i, (key, spec) in enumerate(section.fields.items()):
            sub = f"{path}.{key}" if path else str(key)
            ann = self.annotation(spec, sub)
            extra = {"alias": str(key), **({"description": describe_field(spec)} if describe_field(spec) else {})}
            if spec.default is ...:
                fields[f"f{i}"] = (ann, Field(..., **extra))
            elif isinstance(spec, P.Section):
                fields[f"f{i}"] = (ann, Field(default_factory=_section_default(self.model(spec, sub), spec), **extra))
            else:
                fields[f"f{i}"] = (ann, Field(spec.default, **extra))
        validators = {}
        if section.checks:
            checks = list(section.checks)

            def run_checks(model):
                d = plain(model)
                for check in checks:
                    failure = check(d)
                    if failure:
                        rel, message = failure
                        raise PydanticCustomError("params_check", "{message}", {"rel": rel, "message": message})
                return model

            validators["params_checks"] = model_validator(mode="after")(run_checks)
        name = self._name(path) if not self.cache_on_specs else "Section"
        return create_model(name, __config__=CONFIG, __doc__=getattr(section, "doc", "") or None,
                            __validators__=validators, **fields)

    def annotation(self, spec: "P.Spec", path: str = "") -> Any:
        if type(spec) is P.Number:
            bounds = {k: getattr(spec, k) for k in ("gt", "ge", "lt", "le") if getattr(spec, k) is not None}
            return Annotated[int if spec.integer else float, Field(**bounds)]
        if type(spec) is P.Bool:
            return bool
        if type(spec) is P.Str:
            if spec.choices:
                return Literal[tuple(spec.choices)]
            if spec.pattern:
                pattern = spec.pattern
                return Annotated[str, Field(pattern=f"^(?:{pattern})$"), AfterValidator(_fullmatch(pattern))]
            return str
        if type(spec) is P.Optional:
            return Union[self.annotation(spec.spec, path), None]
        if type(spec) is P.OrAuto:
            return Union[Literal["auto"], self.annotation(spec.spec, path)]
        if type(spec) is P.List:
            length = {"min_length": spec.min_len} if spec.min_len else {}
            if spec.max_len is not None:
                length["max_length"] = spec.max_len
            return Annotated[list[self.annotation(spec.item, f"{path}[]")], Field(**length)]
        if type(spec) is P.Section:
            model = self.model(spec, path)
            if _all_defaults(spec):  # `section:` with nothing under it (null) = all defaults
                return Annotated[Union[model, None], AfterValidator(lambda v, m=model: m() if v is None else v)]
            return model
        if getattr(type(spec), "validate", None) is P.Spec.validate:
            raise TypeError(f"{type(spec).__module__}.{type(spec).__qualname__} is not a spec of pipeline.params "
                            f"and has no validate() of its own")
        return _custom(spec)


def _section_default(model: type[BaseModel], spec: "P.Section"):
    return lambda: model.model_validate({} if spec.default is None else spec.default)


def _fullmatch(pattern: str):
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise PydanticCustomError("string_pattern_mismatch", "String should match pattern '{pattern}'",
                                      {"pattern": pattern})
        return value
    return check


def _custom(spec: "P.Spec") -> Any:
    """A Spec subclass with its own ``validate``: run it, and say the error it raises."""

    def check(value: Any) -> Any:
        try:
            return spec.validate(value, "")
        except P.ParamsError as err:
            raise PydanticCustomError("params_custom", "{message}", {"rel": err.path, "message": err.message}
                                      ) from None

    schema = spec.json_schema() if callable(getattr(spec, "json_schema", None)) else {}
    return Annotated[Any, AfterValidator(check), WithJsonSchema({**schema, "description": describe_field(spec)})]


def describe_field(spec: "P.Spec") -> str:
    """The JSON Schema description of a field: its ``doc`` sentence and what it expects (sections: the doc only)."""
    doc = (getattr(spec, "doc", "") or "").strip()
    if isinstance(spec, P.Section):
        return doc
    what = spec.describe()
    return f"{doc.rstrip('.')}: {what}." if doc else f"{what[:1].upper()}{what[1:]}."


def plain(value: Any) -> Any:
    """Validated models -> plain dicts (params.yaml keys, declaration order) and lists, recursively."""
    if isinstance(value, BaseModel):
        return {f.alias: plain(getattr(value, name)) for name, f in type(value).model_fields.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------ validating
VALIDATION = Compiler(cache_on_specs=True)


def validate(spec: "P.Spec", value: Any, path: str) -> Any:
    """Validate ``value`` against ``spec`` with pydantic; a ParamsError at the dotted ``path`` otherwise."""
    if isinstance(spec, P.Section):
        if value is None and _all_defaults(spec):
            value = {}
        model = VALIDATION.model(spec, path)
        try:
            return plain(model.model_validate(value))
        except ValidationError as err:
            raise to_params_error(err, spec, value, path) from None
    adapter = spec.__dict__.get("_pydantic_adapter")
    if adapter is None:
        adapter = TypeAdapter(VALIDATION.annotation(spec, path), config=CONFIG)
        spec.__dict__["_pydantic_adapter"] = adapter
    try:
        return plain(adapter.validate_python(value))
    except ValidationError as err:
        raise to_params_error(err, spec, value, path) from None


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _join_rel(path: str, rel: str) -> str:
    if not rel:
        return path
    if rel.startswith(("[", ".")):
        return f"{path}{rel}" if path else rel.lstrip(".")
    return _join(path, rel)


def _unwrap(spec: "P.Spec", value: Any) -> "P.Spec":
    while type(spec) is P.Optional and value is not None:
        spec = spec.spec
    return spec


def to_params_error(err: ValidationError, spec: "P.Spec", value: Any, path: str) -> "P.ParamsError":
    """The first problem of a pydantic error as a ParamsError (unknown keys first, as a reader fixes them)."""
    errors = err.errors(include_url=False)
    first = next((e for e in errors if e["type"] in ("extra_forbidden", "invalid_key")), errors[0])
    loc, etype, ctx = list(first["loc"]), first["type"], first.get("ctx") or {}
    # walk the location down the spec tree while it names keys and list items the specs declare
    spec = _unwrap(spec, value)
    while loc:
        step = loc[0]
        if type(spec) is P.Section and isinstance(value, dict) and step in spec.fields:
            path, spec, value = _join(path, step), spec.fields[step], value.get(step, _MISSING)
        elif type(spec) is P.Section and isinstance(value, dict) and etype in ("extra_forbidden", "invalid_key"):
            close = difflib.get_close_matches(str(step), [str(k) for k in spec.fields], n=1, cutoff=0.5)
            hint = f"; did you mean {_join(path, close[0])!r}?" if close else ""
            return P.ParamsError(_join(path, step), f"unknown key{hint} (valid keys: {', '.join(spec.fields)})")
        elif type(spec) is P.List and isinstance(value, list) and isinstance(step, int) and step < len(value):
            path, spec, value = f"{path}[{step}]", spec.item, value[step]
        else:
            break
        loc = loc[1:]
        spec = _unwrap(spec, value)
    if etype in ("params_check", "params_custom"):
        return P.ParamsError(_join_rel(path, ctx["rel"]), ctx["message"])
    if value is _MISSING or etype == "missing":
        return P.ParamsError(path, f"missing (expected {spec.describe()})")
    return P.ParamsError(path, message(spec, value, etype))


def message(spec: "P.Spec", value: Any, etype: str) -> str:
    """What was expected, and what was found, written from the spec."""
    got, typed = _short(value), f"{_short(value)} ({_type_name(value)})"
    if type(spec) is P.Number:
        if etype == "finite_number":
            return f"expected a finite number, got {got}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or etype.endswith("_type"):
            return f"expected {spec.describe()}, got {typed}"
        return f"expected {spec.describe()}, got {_short(value if spec.integer else float(value))}"
    if type(spec) is P.Str:
        if not isinstance(value, str):
            return f"expected {spec.describe()}, got {typed}"
        if spec.choices and value not in spec.choices:
            close = difflib.get_close_matches(value, spec.choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"expected one of {list(spec.choices)}, got {got}{hint}"
        return f"expected {spec.describe()}, got {got}"
    if type(spec) is P.List and isinstance(value, list):
        want = f"{spec.min_len}..{spec.max_len}" if spec.max_len is not None else f">= {spec.min_len}"
        return f"expected a list of length {want}, got {len(value)} items"
    if type(spec) is P.Section:
        return f"expected a mapping, got {typed}"
    if type(spec) is P.OrAuto:
        return f"expected {spec.describe()}, got {got}"
    return f"expected {spec.describe()}, got {typed}"


# ----------------------------------------------------------------------------------- JSON Schema
def _strip_titles(node: Any, root: bool = True) -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "title" and isinstance(v, str) and not root:
                continue
            if k == "properties" and isinstance(v, dict):  # property names are data, not keywords
                out[k] = {name: _strip_titles(sub, False) for name, sub in v.items()}
            else:
                out[k] = _strip_titles(v, False)
        return out
    if isinstance(node, list):
        return [_strip_titles(v, False) for v in node]
    return node


def json_schema(sections: dict[str, "P.Spec"], descriptions: dict[str, str], title: str, description: str) -> dict:
    """JSON Schema (draft 2020-12) of a mapping of top-level sections, from freshly compiled models."""
    model = Compiler(cache_on_specs=False).model(P.Section(dict(sections)), "")
    schema = model.model_json_schema(mode="validation")
    for key, text in descriptions.items():
        if text and key in schema["properties"]:
            prop = schema["properties"][key]
            prop["description"] = f"{prop['description']} {text}" if prop.get("description") else text
    schema = _strip_titles(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, "description": description,
            **{k: v for k, v in schema.items() if k not in ("title", "description")}}
