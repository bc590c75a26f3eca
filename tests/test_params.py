"""Params validation: every malformed params file gives a ParamsError naming the field (or the file), never a
traceback; the pydantic models compiled from the specs give the JSON Schema params.schema.json."""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.params import (Bool, List, Number, Optional, OrAuto, ParamsError, Section, Str, all_schemas,
                             check_all, read_params, schema_text, validate)
from pipeline.params_read import MAX_BYTES

ROOT = Path(__file__).resolve().parents[1]
PARAMS = read_params(ROOT / "params.yaml")
SCHEMAS = all_schemas(ROOT / "dvc.yaml")


def test_repo_params_are_valid_for_every_stage():
    assert check_all(ROOT / "params.yaml", ROOT / "dvc.yaml") == []


def _leaves(spec, value, path):
    """(path, spec, value) of every validated leaf in the current params."""
    if isinstance(spec, Section):
        for key, sub in spec.fields.items():
            if isinstance(value, dict) and key in value:
                yield from _leaves(sub, value[key], path + [key])
    else:
        yield path, spec, value


def _sections():
    seen = {}
    for schema in SCHEMAS.values():
        for key, spec in schema.items():
            seen.setdefault(key, spec)
    return seen


SECTIONS = _sections()
LEAVES = [(p, s, v) for key, spec in SECTIONS.items() for p, s, v in _leaves(spec, PARAMS.get(key), [key])]


def _all_sections(spec, path):
    if isinstance(spec, Section):
        yield path, spec
        for key, sub in spec.fields.items():
            yield from _all_sections(sub, path + [key])


SECTION_PATHS = [(p, s) for key, spec in SECTIONS.items() for p, s in _all_sections(spec, [key])
                 if isinstance(spec, Section)]


def _bad_values(spec):
    """Values that are invalid for `spec` whatever its bounds."""
    inner = spec.spec if isinstance(spec, OrAuto) else spec
    bad = [{"a": 1}, [[["deep"]]]]
    if isinstance(inner, Number):
        bad += ["fast", True, float("nan"), float("inf")]
        if inner.gt is not None:
            bad.append(inner.gt)
        if inner.ge is not None:
            bad.append(inner.ge - 1)
        if inner.le is not None:
            bad.append(inner.le * 10 + 1)
        if inner.integer:
            bad.append(1.5)
    elif isinstance(inner, Bool):
        bad += ["yes", 1, None]
    elif isinstance(inner, Str):
        bad += [123, None, True]
        if inner.choices:
            bad.append(inner.choices[0] + "x")
    return bad


def _set(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def _get(d, path):
    for key in path:
        d = d[key]
    return d


def _validate_all(params):
    for mod, schema in SCHEMAS.items():
        if any(key in params for key in schema):
            validate(schema, params)


@st.composite
def malformed(draw):
    params = copy.deepcopy(PARAMS)
    kind = draw(st.sampled_from(["value", "value", "value", "unknown_key", "drop_key", "not_mapping"]))
    if kind == "value":
        path, spec, _ = draw(st.sampled_from(LEAVES))
        value = draw(st.sampled_from(_bad_values(spec)))
        _set(params, path, value)
        is_list = isinstance(spec.spec if isinstance(spec, (Optional, OrAuto)) else spec, List)
        return params, ".".join(map(str, path)), "list" if is_list else kind
    path, section = draw(st.sampled_from(SECTION_PATHS))
    target = _get(params, path)
    if kind == "unknown_key":
        key = draw(st.sampled_from(list(section.fields)))
        typo = key + draw(st.sampled_from(["x", "_", "s", "2"]))
        assume(typo not in section.fields)  # `langevin_step` + "s" is a real key
        target[typo] = target.get(key, 1)
        return params, ".".join(path + [typo]), kind
    if kind == "drop_key":
        required = [k for k, s in section.fields.items() if s.default is ... and k in target]
        if not required:
            _set(params, path, "oops")
            return params, ".".join(path), "not_mapping"
        key = draw(st.sampled_from(required))
        del target[key]
        return params, ".".join(path + [key]), kind
    _set(params, path, draw(st.sampled_from(["oops", 3, [1, 2]])))
    return params, ".".join(path), kind


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_malformed_params_name_the_field(case):
    params, field, kind = case
    with pytest.raises(ParamsError) as err:
        _validate_all(params)
    # the error names exactly the field that was broken; in a list, the bad item of exactly that list
    if kind == "list":
        assert re.fullmatch(re.escape(field) + r"(\[\d+\])*", err.value.path), (field, str(err.value))
    else:
        assert err.value.path == field, (field, str(err.value))
    assert str(err.value).startswith(f"params.yaml: {err.value.path}: ") and "\n" not in str(err.value)


def test_unknown_key_suggests_closest_name():
    params = copy.deepcopy(PARAMS)
    params["train"]["ve"]["lrr"] = 0.1
    with pytest.raises(ParamsError) as err:
        validate(SCHEMAS["stages.train"], params)
    assert err.value.path == "train.ve.lrr" and "did you mean 'train.ve.lr'" in str(err.value)


def test_relations_are_checked():
    params = copy.deepcopy(PARAMS)
    params["noise"]["sigma_begin"] = 0.001
    with pytest.raises(ParamsError, match="noise.sigma_end: expected sigma_end < sigma_begin"):
        validate(SCHEMAS["stages.noise"], params)
    params = copy.deepcopy(PARAMS)
    params["prepare"]["toy"]["weights"] = [0.5, 0.2]
    with pytest.raises(ParamsError, match="prepare.toy.weights: expected weights summing to 1"):
        validate(SCHEMAS["stages.prepare"], params)
    params = copy.deepcopy(PARAMS)
    params["sample"]["vp"]["sampler"] = "annealed_langevin"
    with pytest.raises(ParamsError, match="sample.vp.sampler"):
        validate(SCHEMAS["stages.sample"], params)


def test_nan_and_bool_are_not_numbers():
    spec = Section({"lr": Number(gt=0)})
    for bad in (float("nan"), True, "1e-3"):
        with pytest.raises(ParamsError, match="lr"):
            spec.validate({"lr": bad}, "train")
    assert math.isclose(spec.validate({"lr": 1}, "train")["lr"], 1.0)


@pytest.mark.parametrize("stage_args, field, mutate", [
    (["stages.train", "--sde", "ve"], "train.ve.lr", lambda p: p["train"]["ve"].__setitem__("lr", -1)),
    (["stages.noise"], "noise.num_levels", lambda p: p["noise"].__setitem__("num_levels", 1)),
    (["stages.prepare"], "prepare.dataset", lambda p: p["prepare"].__setitem__("dataset", "imagenet")),
])
def test_stage_cli_rejects_bad_params_before_work(tmp_path, stage_args, field, mutate):
    params = copy.deepcopy(PARAMS)
    mutate(params)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", *stage_args], cwd=tmp_path, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_unknown_top_level_section_is_reported(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["trian"] = {"steps": 1}
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(params))
    errors = check_all(f, ROOT / "dvc.yaml")
    assert len(errors) == 1 and "trian" in errors[0] and "did you mean 'train'" in errors[0]
    params.pop("trian")
    params["prefect"] = {"max_workers": 2}  # read by pipeline.flow, not by a stage: allowed
    f.write_text(yaml.safe_dump(params))
    assert check_all(f, ROOT / "dvc.yaml") == []


@pytest.mark.parametrize("field,value", [
    ("device", "auto"), ("device", "cpu"), ("device", "cuda"), ("device", "cuda:1"), ("device", "mps"),
    ("device", "gpu"), ("device", "cuda:x"), ("steps", 0), ("steps", 1), ("amp_dtype", "bfloat16"),
    ("amp_dtype", "fp8"), ("optimizer_impl", "fused"), ("optimizer_impl", "sgd"),
])
def test_params_schema_and_train_config_accept_the_same_values(field, value):
    """One source of truth: train.<kind> (and train.device) validate exactly as scoresde.training.TrainConfig."""
    from pipeline.params import ParamsError
    from pipeline.schemas import DEVICE, train_section
    from scoresde.training import TrainConfig

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["ve"]
    try:
        DEVICE.validate(value, "train.device") if field == "device" else train_section("ve").validate(
            {**raw, field: value}, "train.ve")
        schema_ok = True
    except ParamsError:
        schema_ok = False
    try:
        TrainConfig(**{"steps": 1, "batch_size": 1, "lr": 1e-3, field: value})
        config_ok = True
    except ValueError:
        config_ok = False
    assert schema_ok == config_ok


# ------------------------------------------------------------------------------- malformed files
def _flow(value) -> str:
    """One YAML flow-style value (what a params file writes after ``key:``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).split("\n...")[0].strip()


def _emit(data: dict, dup: list | None = None, indent: int = 0, path: tuple = ()) -> tuple[list[str], dict]:
    """Block-style YAML lines of ``data``; the key at path ``dup`` written twice. Returns (lines, {path: line
    numbers (1-based, relative) of that key})."""
    lines, where = [], {}
    for key, value in data.items():
        sub = path + (key,)
        for _ in range(2 if dup is not None and list(sub) == dup else 1):
            where.setdefault(sub, []).append(len(lines) + 1)
            if isinstance(value, dict) and value:
                lines.append(" " * indent + f"{key}:")
                inner, inner_where = _emit(value, dup, indent + 2, sub)
                where.update({k: [len(lines) + n for n in v] for k, v in inner_where.items()})
                lines += inner
            else:
                lines.append(" " * indent + f"{key}: {_flow(value)}")
    return lines, where


def test_the_emitter_round_trips_the_params():
    lines, _ = _emit(PARAMS)
    assert yaml.safe_load("\n".join(lines)) == PARAMS


MAPPING_PATHS = [list(p) for p in _emit(PARAMS)[1]]  # every key of params.yaml, top level and nested
FILE_KINDS = ("binary", "not_utf8", "duplicate_top", "duplicate_nested", "syntax", "tab", "empty", "top_list",
              "top_scalar", "oversized", "too_deep", "recursive_alias", "non_scalar_key")


@st.composite
def bad_files(draw):
    """(kind, bytes of a malformed params file, what the one-line error must say besides the file name)."""
    kind = draw(st.sampled_from(FILE_KINDS))
    lines, _ = _emit(PARAMS)
    text = "\n".join(lines) + "\n"
    if kind == "binary":
        junk = draw(st.binary(min_size=1, max_size=200))
        at = draw(st.integers(0, len(junk)))
        return kind, junk[:at] + b"\x00" + junk[at:], ["binary", "NUL byte"]
    if kind == "not_utf8":
        i = draw(st.integers(0, len(lines) - 1))
        bad = draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3(", b"\x80"]))
        head, tail = ("\n".join(lines[:i]) + ("\n" if i else "")).encode(), "\n".join(lines[i:]).encode()
        raw = head + b"# caf" + bad + b"\n" + tail
        return kind, raw, ["not UTF-8", f"line {i + 1}"]
    if kind in ("duplicate_top", "duplicate_nested"):
        paths = [p for p in MAPPING_PATHS if (len(p) == 1) == (kind == "duplicate_top")]
        dup = draw(st.sampled_from(paths))
        lines, where = _emit(PARAMS, dup)
        first, second = where[tuple(dup)]
        return kind, ("\n".join(lines) + "\n").encode(), [
            ".".join(map(str, dup)) + ": duplicate key", f"at line {second} (first defined at line {first})"]
    if kind == "syntax":
        i = draw(st.integers(0, len(lines)))
        junk = draw(st.sampled_from(["key: [1, 2", "key: {a: 1", "- stray item", "key: 'unterminated", "]", "@x: 1"]))
        return kind, ("\n".join(lines[:i] + [junk] + lines[i:]) + "\n").encode(), ["not valid YAML", "line"]
    if kind == "tab":
        nested = [i for i, line in enumerate(lines) if line.startswith("  ")]
        i = draw(st.sampled_from(nested))
        lines[i] = "\t" + lines[i][2:]
        return kind, ("\n".join(lines) + "\n").encode(), ["tab character", f"line {i + 1}"]
    if kind == "empty":
        return kind, draw(st.sampled_from([b"", b"\n\n", b"# only a comment\n", b"---\n", b"   \n"])), ["empty"]
    if kind == "top_list":
        return kind, draw(st.sampled_from([b"- a\n- b\n", b"[1, 2]\n", b"- experiment: x\n"])), ["mapping", "a list"]
    if kind == "top_scalar":
        return kind, draw(st.sampled_from([b"42\n", b"just text\n", b"3.5\n", b"true\n"])), ["mapping", "scalar"]
    if kind == "too_deep":
        n = draw(st.sampled_from([250, 900, 20_000]))
        return kind, (text + "deep: " + "[" * n + "]" * n + "\n").encode(), ["nesting"]
    if kind == "recursive_alias":
        junk = draw(st.sampled_from(["loop: &a [1, *a]", "loop: &a {x: *a}", "loop: &a {x: [{y: *a}]}"]))
        return kind, (text + junk + "\n").encode(), ["recursive structure"]
    if kind == "non_scalar_key":
        junk = draw(st.sampled_from(["? [a, b]\n: 1", "? {a: 1}\n: 2"]))
        return kind, (text + junk + "\n").encode(), ["not a scalar"]
    pad = draw(st.integers(1, 4096))
    return kind, text.encode() + b"#" * (MAX_BYTES - len(text.encode()) + pad) + b"\n", ["KiB limit"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad_files())
def test_malformed_files_are_one_line_errors_naming_the_file(case):
    kind, raw, says = case
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "params.yaml"
        f.write_bytes(raw)
        with pytest.raises(ParamsError) as err:
            read_params(f)
        message = str(err.value)
        assert str(f) in message and "\n" not in message, (kind, message)
        for part in says:
            assert part in message, (kind, part, message)
        if kind.startswith("duplicate"):
            assert err.value.path == says[0].split(": ")[0]
        elif kind == "recursive_alias":
            assert err.value.path.startswith("loop")
        else:
            assert err.value.path == "<file>"
        assert check_all(f, ROOT / "dvc.yaml") == [message]


def _bad_file(kind: str, folder: Path) -> Path:
    lines, _ = _emit(PARAMS, ["train", "ve", "lr"] if kind == "duplicate_nested" else
                     ["seed"] if kind == "duplicate_top" else None)
    text = "\n".join(lines) + "\n"
    raw = {"binary": b"\x7fELF\x02\x01\x00\x00garbage", "not_utf8": text.encode() + b"# caf\xe9\n",
           "syntax": (text + "key: [1, 2\n").encode(), "tab": text.replace("\n  seed", "\n\tseed").replace(
               "\n  ve:", "\n\tve:").encode(), "empty": b"", "top_list": b"- a\n- b\n", "top_scalar": b"42\n",
           "oversized": text.encode() + b"#" * MAX_BYTES, "too_deep": (text + "d: " + "[" * 9000 + "]" * 9000).encode(),
           "recursive_alias": (text + "loop: &a [1, *a]\n").encode(),
           "non_scalar_key": (text + "? [a, b]\n: 1\n").encode()}.get(kind, text.encode())
    f = folder / f"{kind}.yaml"
    f.write_bytes(raw)
    return f


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_a_stage_refuses_a_malformed_file_before_any_work(tmp_path, monkeypatch, capsys, kind):
    from stages import prepare

    f = _bad_file(kind, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("[prepare] invalid parameters: params.yaml: ") and str(f) in err and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f.name]  # nothing written


def test_the_params_cli_says_each_malformed_file_in_one_line(tmp_path):
    files = [_bad_file(kind, tmp_path) for kind in FILE_KINDS]

    def check(f: Path):
        return subprocess.run([sys.executable, "-m", "pipeline.params", str(f)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        for f, proc in zip(files, pool.map(check, files)):
            assert proc.returncode == 2, (f.name, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and str(f) in lines[0] and "Traceback" not in proc.stderr, (f.name, proc.stderr)
    dup = next(f for f in files if f.name == "duplicate_nested.yaml")
    assert "params.yaml: train.ve.lr: duplicate key in" in check(dup).stderr


def test_yaml_merge_keys_may_override_and_aliases_are_checked_once(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert read_params(f) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}}
    f.write_text("a: &a [1, 2]\nb: [*a, *a, *a]\nc: {k: 1, k: 2}\n")
    with pytest.raises(ParamsError, match=r"c\.k: duplicate key .* at line 3 \(first defined at line 3\)"):
        read_params(f)


def test_an_expected_library_error_ends_the_stage_in_one_message(tmp_path):
    """prepare.dataset: mnist without its files: the dataset error says which files to put where; no traceback."""
    params = copy.deepcopy(PARAMS)
    params["prepare"].update(dataset="mnist", root="no/such/dir", download=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCORESDE_TRACKING": "off"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "stage prepare: MNIST: missing file(s)" in proc.stderr and "t10k-images-idx3-ubyte.gz" in proc.stderr
    assert str(tmp_path / "no/such/dir") in proc.stderr  # where to put them
    assert not (tmp_path / "data").exists()


def test_an_unexpected_error_keeps_its_traceback():
    from pipeline.stage import _expected
    from scoresde.data import DatasetNotFoundError

    assert _expected(DatasetNotFoundError("x")) and not _expected(KeyError("x")) and not _expected(ValueError("x"))


# ----------------------------------------------------------------------------------- JSON Schema
@functools.lru_cache(maxsize=1)
def _json_validator():
    import jsonschema

    schema = json.loads((ROOT / "params.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _json_error_paths(errors) -> list[list]:
    """Paths of the JSON Schema errors, and of the errors under them (a section that may be null is an anyOf)."""
    out = []
    for e in errors:
        out.append(list(e.absolute_path))
        out += _json_error_paths(e.context or [])
    return out


def test_params_schema_json_is_up_to_date_and_params_yaml_follows_it():
    assert (ROOT / "params.schema.json").read_text() == schema_text(ROOT / "dvc.yaml"), \
        "params.schema.json is stale: run python -m pipeline.params --schema"
    assert (ROOT / "params.yaml").read_text().splitlines()[0] == "# yaml-language-server: $schema=params.schema.json"
    errors = [f"{list(e.path)}: {e.message}" for e in _json_validator().iter_errors(yaml.safe_load(
        (ROOT / "params.yaml").read_text()))]
    assert errors == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_json_schema_rejects_what_the_validation_rejects(data):
    """Value mutations pydantic refuses, the JSON Schema (what editors check) refuses at the same path."""
    path, spec, _ = data.draw(st.sampled_from(LEAVES))
    value = data.draw(st.sampled_from([v for v in _bad_values(spec) if not (isinstance(v, float) and
                                                                             not math.isfinite(v))]))
    params = copy.deepcopy(PARAMS)
    _set(params, path, value)
    paths = _json_error_paths(_json_validator().iter_errors(params))
    assert any(p[:len(path)] == path for p in paths), (path, value, paths)
