"""The Prefect flow of the DVC pipeline (pipeline/flow.py) on a tiny synthetic DVC project.

Real components: git, DVC (CLI and API) and Prefect with a temporary local API (the test harness:
a subprocess server on 127.0.0.1 with a throwaway SQLite database). The synthetic project
(benchmarks/orchestration.py: ``make_synthetic_project``) is prepare -> work@a, work@b (independent,
each sleeping) -> report, plus optional ``flaky`` (fails once) and ``broken`` (always fails) stages,
so these tests do not depend on the real, torch-based pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

from _bench import load_benchmark  # noqa: E402  (tests/_bench.py)

from pipeline.dvcgraph import load_pipeline, parse_dot_edges  # noqa: E402
from pipeline.flow import PipelineFailed, reproduce  # noqa: E402
from pipeline.orchestration import OrchestrationConfig  # noqa: E402
from pipeline.params import ParamsError  # noqa: E402
from pipeline.runner import StageFailed, split_command  # noqa: E402


bench = load_benchmark("orchestration")
dvc = bench.dvc
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:dvc.*")  # DVC's own pygtrie usage


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect API (subprocess server on 127.0.0.1, temporary SQLite DB) for this module."""
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_API_URL: None}):
        with prefect_test_harness(server_startup_timeout=None):
            yield


def _runs(project: Path) -> list[str]:
    log = project / "runs.log"
    return log.read_text().split() if log.exists() else []


def _record(project: Path, rel: str) -> dict:
    return json.loads((project / rel).read_text())


# ------------------------------------------------------------------ no Prefect needed
def test_config_defaults_overrides_and_validation(tmp_path):
    cfg = OrchestrationConfig.load(tmp_path / "missing.yaml")
    train = cfg.policy("train@ve")
    assert (train.retries, train.retry_delay_seconds, train.gpu) == (2, (2.0, 10.0), True)
    assert cfg.policy("sample@vp").gpu and not cfg.policy("prepare").gpu

    params = tmp_path / "params.yaml"
    params.write_text(
        "prefect:\n  retries: 3\n  retry_delay_seconds: 1.5\n  gpu_stages: [fit*]\n"
        "  stages:\n    'fit@*': {retries: 1, timeout_s: 60}\n    fit@big: {retry_delay_seconds: [5]}\n")
    cfg = OrchestrationConfig.load(params)
    assert cfg.policy("prepare").retry_delay_seconds == (1.5, 3.0, 6.0)  # exponential backoff from a base
    big = cfg.policy("fit@big")
    assert (big.retries, big.retry_delay_seconds, big.timeout_s, big.gpu) == (1, (5.0,), 60.0, True)
    assert not cfg.policy("train@ve").gpu

    for bad, field in [("retries: -1", "prefect.retries"), ("retry_delay_seconds: [1, x]", "prefect.retry_delay_seconds[1]"),
                       ("max_worker: 2", "prefect.max_worker"), ("stages: {a: {retrys: 1}}", "prefect.stages.a.retrys")]:
        params.write_text(f"prefect:\n  {bad}\n")
        with pytest.raises(ParamsError, match=field.replace("[", r"\[").replace("]", r"\]")):
            OrchestrationConfig.load(params)


def test_commands_run_without_a_shell():
    assert split_command("python -m stages.train --sde 've'") == ["python", "-m", "stages.train", "--sde", "ve"]
    for cmd in ["python a.py && python b.py", "python a.py > out.txt", "cat x | wc"]:
        with pytest.raises(StageFailed, match="shell"):
            split_command(cmd)


def test_graph_is_dvcs_own_graph(tmp_path):
    project = bench.make_synthetic_project(tmp_path / "p", flaky=True, broken=True, sleep=0)
    pipeline = load_pipeline(project)
    assert pipeline.edges() == parse_dot_edges(dvc(project, "dag", "--dot").stdout)
    assert set(pipeline.stages) == {"prepare", "work@a", "work@b", "report", "flaky", "broken"}
    assert pipeline.order.index("prepare") < pipeline.order.index("work@b") < pipeline.order.index("report")
    assert pipeline.stages["report"].upstream == ("work@a", "work@b")
    assert pipeline.stages["work@a"].cmd[0].endswith("--sleep 0")  # foreach/templating resolved by DVC
    # targets select like `dvc repro TARGET`: the target and what it depends on
    assert load_pipeline(project, ["report"]).order == ["prepare", "work@a", "work@b", "report"]
    assert load_pipeline(project, ["work"]).order == ["prepare", "work@a", "work@b"]
    assert pipeline.downstream("prepare") == {"work@a", "work@b", "report", "flaky", "broken"}


# --------------------------------------------------------------------- with Prefect
def test_flow_runs_independent_stages_concurrently_and_leaves_dvc_clean(prefect_api, tmp_path):
    project = bench.make_synthetic_project(tmp_path / "p", sleep=2.0)
    results = reproduce(repo=str(project), max_workers=2, track=False, run_group="test-group")
    assert results == {"prepare": "ran", "work@a": "ran", "work@b": "ran", "report": "ran"}
    for rel in ["data/raw.json", "data/work_a.json", "data/work_b.json", "reports/report.json", "reports/metrics.json"]:
        assert (project / rel).exists(), rel
    assert _record(project, "reports/report.json")["value"] == 5  # 1 + (2 + 2): inputs really flowed

    a, b = _record(project, "data/work_a.json"), _record(project, "data/work_b.json")
    overlap = min(a["end"], b["end"]) - max(a["start"], b["start"])
    assert overlap > 1.0, f"work@a and work@b did not run at the same time (overlap {overlap:.2f} s)"
    assert a["dvc_stage"] == "work@a" and a["run_group"] == "test-group"

    assert "Data and pipelines are up to date" in dvc(project, "status").stdout
    runs_before = _runs(project)
    repro = dvc(project, "repro")
    assert "Data and pipelines are up to date" in repro.stdout or "Running stage" not in repro.stdout, repro.stdout
    assert _runs(project) == runs_before, "dvc repro re-ran stages after the flow"

    again = reproduce(repo=str(project), max_workers=2, track=False)
    assert set(again.values()) == {"skipped"}
    assert _runs(project) == runs_before


def test_transient_failure_is_retried_and_the_flow_completes(prefect_api, tmp_path):
    project = bench.make_synthetic_project(tmp_path / "p", sleep=0, flaky=True)
    results = reproduce(repo=str(project), targets=["flaky"], max_workers=2, track=False)
    assert results == {"prepare": "ran", "flaky": "ran"}
    assert (project / "flaky.marker").read_text() == "2"  # failed once, succeeded on the retry
    assert _runs(project).count("flaky") == 2
    assert "Data and pipelines are up to date" in dvc(project, "status", "flaky").stdout


def test_failing_stage_fails_the_flow_with_its_log_tail(prefect_api, tmp_path):
    project = bench.make_synthetic_project(tmp_path / "p", sleep=0, broken=True)
    with pytest.raises(PipelineFailed) as info:
        reproduce(repo=str(project), max_workers=2, track=False)
    message = str(info.value)
    assert "broken" in message and "exited with code 3" in message
    assert "FATAL: broken cannot continue" in message and "broken progress line 99" in message
    assert "broken progress line 60\n" not in message  # only the tail (last 40 lines)
    assert "attempt 2" in message  # per-stage override: retries=1 for `broken`
    assert _runs(project).count("broken") == 2
    # keep_going: the independent branch still completed and was recorded
    assert (project / "reports" / "report.json").exists()
    assert "Data and pipelines are up to date" in dvc(project, "status", "report").stdout
    assert "broken" in dvc(project, "status").stdout


def test_two_clones_exchange_stages_through_a_dvc_remote(prefect_api, tmp_path):
    """Host A runs part of the pipeline and pushes; host B pulls/restores it and runs the rest."""
    remote = tmp_path / "remote"
    host_a = bench.make_synthetic_project(tmp_path / "a", sleep=0, remote=remote)
    host_b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(host_a), str(host_b)], check=True)

    first = reproduce(repo=str(host_a), targets=["work"], max_workers=2, track=False, dvc_remote="shared")
    assert first == {"prepare": "ran", "work@a": "ran", "work@b": "ran"}
    assert any(remote.rglob("*")), "nothing was pushed to the DVC remote"

    second = reproduce(repo=str(host_b), max_workers=2, track=False, dvc_remote="shared")
    assert second["report"] == "ran"
    assert all(second[s] in {"restored", "pulled"} for s in ("prepare", "work@a", "work@b")), second
    assert _runs(host_b) == ["report"]  # B never re-ran A's stages
    assert "Data and pipelines are up to date" in dvc(host_b, "status").stdout

    # and back: A gets B's stage (incl. its `cache: false` metrics) without running it
    third = reproduce(repo=str(host_a), max_workers=2, track=False, dvc_remote="shared")
    assert third["report"] in {"restored", "pulled"}
    assert json.loads((host_a / "reports" / "metrics.json").read_text()) == {"value": 5}
    assert "report" not in _runs(host_a)
    assert "Data and pipelines are up to date" in dvc(host_a, "status").stdout


@pytest.mark.slow
def test_cli_runs_with_an_ephemeral_prefect_and_reports_failures(tmp_path):
    project = bench.make_synthetic_project(tmp_path / "p", sleep=0, broken=True)
    env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    ok = subprocess.run([sys.executable, "-m", "pipeline.flow", "--repo", str(project), "--targets", "report"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "report" in ok.stdout and "ran" in ok.stdout
    record = _record(project, "reports/report.json")
    assert record["parent_run_id"], "the MLflow parent run id did not reach the stage"
    bad = subprocess.run([sys.executable, "-m", "pipeline.flow", "--repo", str(project), "--no-track"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "FATAL: broken cannot continue" in bad.stderr
    print(f"CLI runs took {time.perf_counter() - start:.1f} s")
