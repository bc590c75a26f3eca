"""Params validation: every malformed params file gives a ParamsError naming the field, never a traceback."""
from __future__ import annotations

import copy
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.params import (Bool, Number, OrAuto, ParamsError, Section, Str, all_schemas, check_all, read_params,
                             validate)

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
        return params, ".".join(map(str, path)), kind
    path, section = draw(st.sampled_from(SECTION_PATHS))
    target = _get(params, path)
    if kind == "unknown_key":
        key = draw(st.sampled_from(list(section.fields)))
        typo = key + draw(st.sampled_from(["x", "_", "s", "2"]))
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
    # the error names the field that was broken (or, for a list item, its list)
    assert err.value.path.startswith(field) or field.startswith(err.value.path.split("[")[0]), (field, str(err.value))
    assert "params.yaml: " in str(err.value)


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
