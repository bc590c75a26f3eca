"""The Prefect flow of the DVC pipeline (pipeline/flow.py) on a tiny synthetic DVC project.

Also: progress-bar throttling of the relayed output (pipeline/flow_output.py), the flow run's Prefect
artifacts (stage table, report, MLflow parent run), and no retry of invalid parameters (exit status 2)
with a real stage of this repository.

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
from pipeline.runner import StageFailed, run_command, split_command  # noqa: E402


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
    assert (train.retries, train.retry_delay_seconds, train.gpu) == (2, (2.0, 4.0), True)
    assert train.backoff_factor == 2.0 and train.prefect_delays()(3) == [2.0, 4.0, 8.0]  # prefect's exponential_backoff
    assert cfg.policy("sample@vp").gpu and not cfg.policy("prepare").gpu
    assert cfg["report_markdown"] == "reports/report.md" and cfg["progress_interval_s"] == 10.0

    params = tmp_path / "params.yaml"
    params.write_text(
        "prefect:\n  retries: 3\n  retry_delay_seconds: 1.5\n  gpu_stages: [fit*]\n"
        "  stages:\n    'fit@*': {retries: 1, timeout_s: 60}\n    fit@big: {retry_delay_seconds: [5]}\n")
    cfg = OrchestrationConfig.load(params)
    assert cfg.policy("prepare").retry_delay_seconds == (1.5, 3.0, 6.0)  # exponential backoff from a base
    big = cfg.policy("fit@big")
    assert (big.retries, big.retry_delay_seconds, big.timeout_s, big.gpu) == (1, (5.0,), 60.0, True)
    assert big.backoff_factor is None and big.prefect_delays() == [5.0]  # an explicit list stays a list
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


# ------------------------------------------------------------ progress throttling
PROGRESS_CHILD = r'''
import sys, time
print("starting", flush=True)
t0, i = time.time(), 0
while time.time() - t0 < float(sys.argv[1]):
    sys.stderr.write(f"\rtrain: {i % 100:3d}%|#####     | {i}/100000 [00:01<00:10, 999.0it/s]")
    sys.stderr.flush()
    i += 1
    time.sleep(0.002)
sys.stderr.write(f"\rtrain: 100%|##########| {i}/{i} [00:01<00:00, 999.0it/s]\n")
print(f"done after {i} refreshes", flush=True)
'''


def _progress_run(tmp_path, seconds: float, interval: float):
    records: list[str] = []
    log = tmp_path / f"stage-{interval}.log"
    start = time.perf_counter()
    code, tail, timed_out = run_command([sys.executable, "-c", PROGRESS_CHILD, str(seconds)], cwd=str(tmp_path),
                                        env=dict(os.environ), tail_lines=40, log_file=log, timeout_s=60,
                                        on_line=records.append, progress_interval_s=interval)
    assert code == 0 and not timed_out
    refreshes = int(records[-1].split()[2])
    return records, tail, log, refreshes, time.perf_counter() - start


def test_progress_lines_are_throttled_and_the_last_one_is_kept(tmp_path):
    """A child redrawing a tqdm-like bar ~every 2 ms: ordinary lines all pass, the bar at most once per interval."""
    records, tail, log, refreshes, _ = _progress_run(tmp_path, 1.5, interval=10.0)
    assert refreshes > 100, refreshes
    # starting, the bar's first state, its last state (before the next ordinary line), done
    assert records[0] == "starting" and records[-1].startswith("done after")
    assert len(records) == 4, records
    assert records[2] == f"train: 100%|##########| {refreshes}/{refreshes} [00:01<00:00, 999.0it/s]"
    assert tail == [records[0], records[2], records[3]]  # consecutive progress lines: the newest in the tail
    assert sum(line.startswith("train:") for line in log.read_text().splitlines()) == 2  # same records in the log file

    records, _, _, refreshes, seconds = _progress_run(tmp_path, 1.5, interval=0.4)
    bars = [r for r in records if r.startswith("train:")]
    assert 2 <= len(bars) <= seconds / 0.4 + 2, (len(bars), seconds)  # ~one per interval, not one per redraw


def test_output_relay_splits_carriage_returns_and_orders_records():
    from pipeline.flow_output import OutputRelay

    now = [0.0]
    out: list[str] = []
    relay = OutputRelay(out.append, tail_lines=10, interval_s=10.0, clock=lambda: now[0])
    relay.feed(b"hello\n\rbar 1/9 [00:00")
    for i in range(2, 10):
        now[0] += 3.0
        relay.feed(f"\rbar {i}/9 [00:0{i}".encode())
    relay.feed(b"\r")                     # a \r at a chunk's end may be half of \r\n ...
    relay.feed(b"\nwindows line\r\n\xc3")  # ... and a UTF-8 character split over chunks
    relay.feed(b"\xa9t\xc3\xa9\nno newline at the end")
    relay.finish()
    # t=0 first bar; t=12 (bar 5) the next one at >= 10 s; bar 9 held back, emitted before the next line
    assert out == ["hello", "bar 1/9 [00:00", "bar 5/9 [00:05", "bar 9/9 [00:09", "windows line", "été",
                   "no newline at the end"]


# ------------------------------------------------------------------ artifacts, retries
SUMMARY_SCRIPT = '''\
import json, os
values = {p: json.load(open(p))["value"] for p in ["data/work_a.json", "data/work_b.json"]}
os.makedirs("reports", exist_ok=True)
with open("reports/report.md", "w") as f:
    f.write("# Synthetic report\\n\\n| input | value |\\n|---|---|\\n"
            + "".join(f"| {k} | {v} |\\n" for k, v in values.items()))
'''


def _artifacts(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}  # (Prefect adds an unkeyed result artifact to a failed run)


def test_flow_run_publishes_stage_table_report_and_mlflow_run(prefect_api, tmp_path, monkeypatch):
    """A failing flow run (keep_going) still publishes its three artifacts to the Prefect API."""
    import yaml

    project = bench.make_synthetic_project(tmp_path / "p", sleep=0, broken=True, commit=False)
    (project / "scripts" / "summary.py").write_text(SUMMARY_SCRIPT)
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["summary"] = {"cmd": "python scripts/summary.py", "deps": ["data/work_a.json", "data/work_b.json"],
                                     "outs": ["reports/report.md"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    bench._git(project, "add", "-A")
    bench._git(project, "commit", "-q", "-m", "synthetic project with a Markdown report")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    state = reproduce(repo=str(project), max_workers=2, return_state=True)
    assert state.is_failed()
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert set(artifacts) == {"scoresde-stages", "scoresde-report", "scoresde-mlflow-run"}, list(artifacts)

    table = artifacts["scoresde-stages"]
    assert table.type == "table"
    rows = {row["stage"]: row for row in json.loads(table.data)}
    assert list(rows) == load_pipeline(project).order
    assert {n: r["action"] for n, r in rows.items()} == {
        "prepare": "ran", "work@a": "ran", "work@b": "ran", "report": "ran", "broken": "failed", "summary": "ran"}
    assert rows["broken"]["attempts"] == 2 and rows["prepare"]["attempts"] == 1  # `broken` has retries: 1
    assert all(r["seconds"] > 0 for r in rows.values())

    report = artifacts["scoresde-report"]
    assert report.type == "markdown" and "# Synthetic report" in report.data and "data/work_a.json" in report.data

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = mlflow.search_runs(experiment_names=["synthetic"], filter_string="tags.`scoresde.role` = 'parent'")
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FAILED"
    run = artifacts["scoresde-mlflow-run"]
    assert run.type == "markdown"  # a local sqlite store has no URL: the run's coordinates instead
    assert parent.iloc[0]["run_id"] in run.data and "mlflow ui --backend-store-uri sqlite:///" in run.data
    assert f"#/experiments/{parent.iloc[0]['experiment_id']}/runs/{parent.iloc[0]['run_id']}" in run.data

    # the next run of the report's branch: everything up to date (the report verified, not rebuilt)
    again = _artifacts(reproduce(repo=str(project), targets=["summary"], track=False, return_state=True)
                       .state_details.flow_run_id)
    assert set(again) == {"scoresde-stages", "scoresde-report"}  # no MLflow run: no link
    assert {r["action"] for r in json.loads(again["scoresde-stages"].data)} == {"skipped"}
    assert "up to date" in again["scoresde-report"].description


def test_mlflow_link_for_a_tracking_server():
    from pipeline.flow_tracking import run_link

    link = run_link("abc123", "http://127.0.0.1:5000/", experiment_id="7")
    assert link["url"] == "http://127.0.0.1:5000/#/experiments/7/runs/abc123"
    local = run_link("abc123", "sqlite:////tmp/mlflow.db", experiment_id="7")
    assert "url" not in local and local["url_when_served"].endswith("/#/experiments/7/runs/abc123")


def test_invalid_params_fail_on_the_first_attempt(prefect_api, tmp_path):
    """A real stage of this repository exits 2 on invalid params: failed at once despite `prefect.retries: 2`."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location("pipeline_e2e", ROOT / "tests" / "test_pipeline_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    def bad_params(params: dict) -> dict:
        p = e2e.tiny_params(params)
        p["prepare"]["dataset"] = "imagenette"
        p["prefect"] = {**(p.get("prefect") or {}), "retries": 2, "retry_delay_seconds": 0.5}
        return p

    repo = tmp_path / "repo"
    repo.mkdir()
    e2e.make_repo(repo, params_fn=bad_params)
    assert yaml.safe_load((repo / "params.yaml").read_text())["prefect"]["retries"] == 2
    state = reproduce(repo=str(repo), targets=["prepare"], track=False, return_state=True)
    assert state.is_failed()
    rows = json.loads(_artifacts(state.state_details.flow_run_id)["scoresde-stages"].data)
    assert rows == [{"stage": "prepare", "action": "failed", "attempts": 1, "seconds": rows[0]["seconds"]}]
    with pytest.raises(PipelineFailed) as info:
        state.result()
    message = str(info.value)
    assert "exited with code 2 (invalid parameters or usage: not retried)" in message
    assert "prepare.dataset" in message and "imagenette" in message and "attempt 2" not in message


# ------------------------------------------------------------- runs left RUNNING
def test_stale_parent_runs_of_dead_flow_processes_are_closed(tmp_path, monkeypatch):
    """The next flow closes a parent run (and its stage runs) whose flow process is gone on this host;
    the on_crashed hook closes the parent run of its own flow run."""
    import socket
    import types

    import mlflow
    import yaml
    from mlflow.tracking import MlflowClient

    from pipeline import flow_tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = mlflow.set_experiment("stale").experiment_id
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, alive_pid, host = dead.stdout.strip(), str(os.getppid()), socket.gethostname()

    def run(role: str | None, pid: str, parent: str | None = None, flow_run_id: str = "") -> str:
        tags = {"host": host, "pid": pid, "prefect.flow_run_id": flow_run_id}
        if role:
            tags.update({"scoresde.role": role, "orchestrator": "prefect"})
        if parent:
            tags["mlflow.parentRunId"] = parent
        return client.create_run(exp, tags=tags).info.run_id

    lost = run("parent", dead_pid)
    lost_stage = run(None, dead_pid, parent=lost)
    live = run("parent", alive_pid)
    live_stage = run(None, alive_pid, parent=live)
    closed = flow_tracking.close_stale_parent_runs("stale", check_prefect=False)
    assert sorted(closed) == sorted([lost, lost_stage])
    status = {r: client.get_run(r).info.status for r in (lost, lost_stage, live, live_stage)}
    assert status == {lost: "KILLED", lost_stage: "KILLED", live: "RUNNING", live_stage: "RUNNING"}
    assert "is gone" in client.get_run(lost).data.tags["scoresde.end_reason"]

    # on_crashed / on_cancellation: the crashed flow run's own parent run, found by its Prefect id
    project = bench.make_synthetic_project(tmp_path / "p", sleep=0)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["experiment"] = "stale"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    crashed = run("parent", alive_pid, flow_run_id="6f1c4a5e-0000-4000-8000-000000000001")
    flow_run = types.SimpleNamespace(id="6f1c4a5e-0000-4000-8000-000000000001", parameters={"repo": str(project)})
    flow_tracking.close_parent_on_crash(None, flow_run, types.SimpleNamespace(type=types.SimpleNamespace(value="CRASHED")))
    assert client.get_run(crashed).info.status == "KILLED" and client.get_run(live).info.status == "RUNNING"

