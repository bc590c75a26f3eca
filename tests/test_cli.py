"""Every command-line entry point answers ``--help``: exit status 0, the usage, and a paragraph saying what it does.

The commands run in subprocesses (as a user types them), four at a time: most of the time is interpreter
and import start-up.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(f"stages.{p.stem}" for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")
TOOLS = ["pipeline.params", "pipeline.flow", "pipeline.report", "pipeline.configs", "pipeline.sweep",
         "pipeline.tracking", "pipeline.deps"]
ENTRY_POINTS = STAGES + TOOLS


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}

    def run(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(ENTRY_POINTS, pool.map(run, ENTRY_POINTS)))


def description(help_text: str) -> str:
    """The first paragraph after argparse's usage block (empty if the parser has no description)."""
    paragraphs = [p.strip() for p in help_text.strip().split("\n\n")]
    if not paragraphs or not paragraphs[0].startswith("usage:"):
        return ""
    rest = paragraphs[1] if len(paragraphs) > 1 else ""
    return "" if rest.startswith(("options:", "optional arguments:", "positional arguments:")) else rest


def test_every_stage_module_is_covered():
    assert {"stages.train", "stages.prepare", "stages.report"} <= set(STAGES)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_zero_with_a_description(helps, module):
    proc = helps[module]
    assert proc.returncode == 0, f"python -m {module} --help: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.startswith(f"usage: python -m {module}") or proc.stdout.startswith("usage: "), proc.stdout
    text = description(proc.stdout)
    assert len(text) >= 30 and " " in text, f"python -m {module} --help has no description paragraph:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr


def test_description_parser():
    assert description("usage: x [-h]\n\nDoes things to stuff.\n\noptions:\n  -h") == "Does things to stuff."
    assert description("usage: x [-h]\n\noptions:\n  -h, --help") == ""
    assert description("x: error: nope") == ""
