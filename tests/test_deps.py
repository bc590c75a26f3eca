"""The layers DVC relies on: each stage's deps cover the code it runs; stages only wire; libraries stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import deps

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_lists_exactly_the_code_it_imports():
    problems = deps.check(ROOT)
    assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())


def test_closure_follows_imports_inside_functions_and_relative_ones(tmp_path):
    for pkg in ("scoresde", "pipeline", "stages"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text('"""doc"""\n__version__ = "1"\n')
    (tmp_path / "stages" / "s.py").write_text("from pipeline import a\n")
    (tmp_path / "pipeline" / "a.py").write_text("def f():\n    from scoresde.b import g\n")
    (tmp_path / "scoresde" / "b.py").write_text("from . import c\nfrom .c import h\n")
    (tmp_path / "scoresde" / "c.py").write_text("import torch\n")
    (tmp_path / "pipeline" / "tracking.py").write_text("from scoresde import never\n")  # harness: not followed
    (tmp_path / "stages" / "t.py").write_text("from pipeline.tracking import x\nimport pipeline.a\n")
    closure = {p.as_posix() for p in deps.import_closure("stages.s", tmp_path)}
    assert closure == {"stages/s.py", "pipeline/a.py", "scoresde/b.py", "scoresde/c.py"}
    assert {p.as_posix() for p in deps.import_closure("stages.t", tmp_path)} == {"stages/t.py", "pipeline/a.py",
                                                                               "scoresde/b.py", "scoresde/c.py"}
    (tmp_path / "scoresde" / "__init__.py").write_text("from scoresde import c\n")  # an __init__ that runs code
    assert "scoresde/__init__.py" in {p.as_posix() for p in deps.import_closure("stages.s", tmp_path)}


def test_check_names_a_missing_dep(tmp_path):
    for name in ("scoresde", "pipeline", "stages"):
        (tmp_path / name).mkdir()
    (tmp_path / "stages" / "s.py").write_text("from pipeline import a\n")
    (tmp_path / "pipeline" / "a.py").write_text("x = 1\n")
    (tmp_path / "pipeline" / "b.py").write_text("x = 1\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "python -m stages.s",
                                                                        "deps": ["stages/s.py", "pipeline/b.py"]}}}))
    assert deps.check(tmp_path) == {"s": {"missing": ["pipeline/a.py"], "superfluous": ["pipeline/b.py"]}}


def _imports(path: Path) -> list[str]:
    mods = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mods.append("." * node.level + (node.module or ""))
    return mods


@pytest.mark.parametrize("path", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_only_wire(path):
    bad = [m for m in _imports(path) if m.startswith(("stages", "."))]
    assert not bad, f"{path.name} imports another stage: {bad} (move the shared code to pipeline/ or scoresde/)"
    assert len(path.read_text().splitlines()) <= 100, f"{path.name}: a stage only wires (at most ~100 lines)"


@pytest.mark.parametrize("path", sorted([*(ROOT / "scoresde").glob("*.py"), *(ROOT / "pipeline").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_library_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 500, f"{path}: split by concern (at most ~500 lines)"


def test_science_library_imports_no_orchestration():
    for path in (ROOT / "scoresde").glob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("dvc", "prefect", "mlflow", "pipeline", "stages")]
        assert not bad, f"{path.name}: {bad}"


def test_one_list_of_model_kinds():
    from pipeline.schemas import MODEL_KINDS

    dvc_vars = yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]
    sdes = next(v["sdes"] for v in dvc_vars if "sdes" in v)
    assert tuple(sdes) == MODEL_KINDS
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert tuple(k for k in params["train"] if k != "device") == MODEL_KINDS
    assert tuple(k for k in params["sample"] if k != "device") == MODEL_KINDS


def test_only_the_report_reads_logging_settings():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        params = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("do", stage).get("params", [])]
        assert "tracking" not in params, name
        assert "experiment" not in params or name == "report", name
        # torch's CPU thread count changes float results: every stage that computes lists it
        assert "cpu_threads" in params or name == "report", name
