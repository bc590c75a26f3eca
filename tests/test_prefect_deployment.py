"""The flow deployed on a real Prefect server and run by real process workers (slow).

Everything is started and stopped here, bound to 127.0.0.1 on free ports, offline:
``prefect server start``, process work pools, ``prefect --no-prompt deploy`` from this repository's
``prefect.yaml`` (copied into a synthetic DVC project together with ``pipeline/``), and
``prefect worker start --run-once``. MLflow logs to a SQLite file in the test's tmp directory.

1. The ``local`` deployment runs the whole synthetic pipeline: the flow run completes, ``dvc status``
   is clean, MLflow holds the parent run with one nested run per stage, and the flow run carries its
   Prefect artifacts (stage table, report summary, MLflow parent run).
2. Two workers on two clones sharing one DVC directory remote: worker A runs ``work`` (and its
   upstream) and pushes; worker B pulls/restores those and runs only the downstream ``report``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90"}
for _k, _v in OFFLINE.items():
    os.environ.setdefault(_k, _v)

from _bench import load_benchmark  # noqa: E402  (tests/_bench.py)

pytestmark = pytest.mark.slow


bench = load_benchmark("orchestration")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process group this test started (its own session), politely first."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 10)):  # workers ignore the 1st TERM
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1:<free port> with its own PREFECT_HOME (fresh database)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, **OFFLINE, "PREFECT_HOME": str(home),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, log)
        api = f"http://127.0.0.1:{port}/api"
        yield {"api": api, "env": {**env, "PREFECT_API_URL": api}, "home": home}
    finally:
        stop(proc)


@pytest.fixture
def api(server):
    """In-process Prefect client settings pointing at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server["api"]}):
        yield server


def prefect_cli(server: dict, *args: str, cwd: Path, env: dict | None = None, timeout: float = 180):
    proc = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env={**server["env"], **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def run_worker(server: dict, pool: str, cwd: Path, env: dict, log: Path, timeout: float = 420) -> None:
    """``prefect worker start --pool POOL --run-once``: picks up the scheduled run, exits when it is done."""
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                                cwd=cwd, env={**server["env"], **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    finally:
        stop(proc)


def flow_run_state(flow_run_id) -> tuple[str, str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state.type.value, state.message or ""


def read_artifacts(flow_run_id) -> dict:
    """The keyed Prefect artifacts of a flow run, by key."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def create_pool(server: dict, name: str, cwd: Path) -> None:
    prefect_cli(server, "work-pool", "create", name, "--type", "process", cwd=cwd)


def test_local_deployment_on_a_process_worker(api, tmp_path):
    from prefect.deployments import run_deployment

    # work@a / work@b play the GPU stages here: tagged "gpu", and the documented limit allows one at a time
    project = bench.make_synthetic_project(
        tmp_path / "project", sleep=1.0, mlflow=True, copy_pipeline=True,
        prefect={"retries": 1, "retry_delay_seconds": 0.5, "gpu_stages": ["work*"]})
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    create_pool(api, "local", tmp_path)
    create_pool(api, "gpu", tmp_path)
    prefect_cli(api, "concurrency-limit", "create", "gpu", "1", cwd=tmp_path)
    prefect_cli(api, "--no-prompt", "deploy", "--all", cwd=project)  # both deployments of prefect.yaml

    from prefect import get_client

    with get_client(sync_client=True) as client:
        gpu = client.read_deployment_by_name("reproduce/gpu")
    assert gpu.work_pool_name == "gpu" and "gpu" in gpu.tags
    assert gpu.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert gpu.parameters["targets"] == ["train", "sample"]

    flow_run = run_deployment("reproduce/local", parameters={"max_workers": 2}, timeout=0)
    log = tmp_path / "worker.log"
    run_worker(api, "local", tmp_path, {"SCORESDE_REPO": str(project), "MLFLOW_TRACKING_URI": mlflow_uri}, log)
    state, message = flow_run_state(flow_run.id)
    assert state == "COMPLETED", f"{state}: {message}\n{log.read_text()[-4000:]}"

    for rel in ["data/raw.json", "data/work_a.json", "data/work_b.json", "reports/report.json", "reports/metrics.json"]:
        assert (project / rel).exists(), rel
    assert "Data and pipelines are up to date" in bench.dvc(project, "status").stdout

    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["synthetic"])
    parents = runs[runs["tags.scoresde.role"] == "parent"]
    assert len(parents) == 1, runs[["run_id", "tags.mlflow.runName"]]
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED"
    assert parent["tags.prefect.flow_run_id"] == str(flow_run.id)
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert set(children["tags.dvc_stage"]) == {"prepare", "work@a", "work@b", "report"}
    record = json.loads((project / "reports" / "report.json").read_text())
    assert record["parent_run_id"] == parent["run_id"]

    # the flow run's Prefect artifacts: stage table, report (a summary: this project has no report.md),
    # and the MLflow parent run (a local sqlite store: its coordinates, not a link)
    artifacts = read_artifacts(flow_run.id)
    assert {"scoresde-stages", "scoresde-report", "scoresde-mlflow-run"} <= set(artifacts), list(artifacts)
    rows = json.loads(artifacts["scoresde-stages"].data)
    assert [(r["stage"], r["action"], r["attempts"]) for r in rows] == [
        ("prepare", "ran", 1), ("work@a", "ran", 1), ("work@b", "ran", 1), ("report", "ran", 1)]
    assert "No Markdown report" in artifacts["scoresde-report"].data
    assert parent["run_id"] in artifacts["scoresde-mlflow-run"].data

    # the `gpu` tag concurrency limit (1) kept the two gpu-tagged stages apart
    a, b = (json.loads((project / "data" / f"work_{i}.json").read_text()) for i in "ab")
    assert min(a["end"], b["end"]) <= max(a["start"], b["start"]) + 0.05, (a, b)


def test_two_workers_exchange_stages_through_a_dvc_remote(api, tmp_path):
    """Two hosts = two clones + two process workers sharing one directory DVC remote."""
    from prefect.deployments import run_deployment

    from pipeline.flow import reproduce

    remote = tmp_path / "remote"
    host_a = bench.make_synthetic_project(tmp_path / "host-a", sleep=0.2, remote=remote, copy_pipeline=True)
    host_b = tmp_path / "host-b"
    subprocess.run(["git", "clone", "-q", str(host_a), str(host_b)], check=True)

    for host, pool, params in [(host_a, "host-a", {"targets": ["work"]}), (host_b, "host-b", {})]:
        create_pool(api, pool, tmp_path)
        reproduce.from_source(source=str(host), entrypoint="pipeline/flow.py:reproduce").deploy(
            name=pool, work_pool_name=pool, print_next_steps=False,
            parameters={"dvc_remote": "shared", "track": False, "max_workers": 2, **params})

    for host, pool in [(host_a, "host-a"), (host_b, "host-b")]:
        flow_run = run_deployment(f"reproduce/{pool}", timeout=0)
        log = tmp_path / f"worker-{pool}.log"
        run_worker(api, pool, host, {}, log)
        state, message = flow_run_state(flow_run.id)
        assert state == "COMPLETED", f"{pool}: {state}: {message}\n{log.read_text()[-4000:]}"

    runs_a = (host_a / "runs.log").read_text().split()
    runs_b = (host_b / "runs.log").read_text().split()
    assert sorted(runs_a) == ["prepare", "work@a", "work@b"]
    assert runs_b == ["report"], "worker B re-ran stages that worker A had pushed"
    assert (host_b / "data" / "work_a.json").exists()
    assert "Data and pipelines are up to date" in bench.dvc(host_b, "status").stdout


def test_real_pipeline_on_tiny_params_through_the_local_deployment(api, tmp_path):
    """This repository's own pipeline (all its stages, tiny params), deployed from its prefect.yaml and run by a
    real process worker: the run completes, every stage is recorded in dvc.lock (`dvc status` clean, a
    second `dvc repro` is a no-op), MLflow holds one parent run with a nested run per stage, and the
    flow run's report artifact is the pipeline's reports/report.md."""
    from prefect.deployments import run_deployment

    spec = importlib.util.spec_from_file_location("pipeline_e2e", ROOT / "tests" / "test_pipeline_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    dvc, env_for, make_repo = e2e.dvc, e2e.env_for, e2e.make_repo

    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo)
    (repo / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    mlflow_uri = f"sqlite:///{repo / 'mlflow.db'}"
    prefect_cli(api, "work-pool", "create", "local", "--type", "process", "--overwrite", cwd=tmp_path)  # module server
    prefect_cli(api, "--no-prompt", "deploy", "--name", "local", cwd=repo)

    flow_run = run_deployment("reproduce/local", parameters={"max_workers": 2}, timeout=0)
    log = tmp_path / "worker.log"
    env = {k: v for k, v in env_for(repo).items() if k != "SCORESDE_RUN_GROUP"}
    run_worker(api, "local", tmp_path, {**env, "SCORESDE_REPO": str(repo), "MLFLOW_TRACKING_URI": mlflow_uri}, log,
               timeout=900)
    state, message = flow_run_state(flow_run.id)
    assert state == "COMPLETED", f"{state}: {message}\n{log.read_text()[-4000:]}"

    assert "up to date" in dvc(repo, "status").stdout
    assert "Running stage" not in dvc(repo, "repro").stdout

    import mlflow
    import yaml

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["e2e"])
    parents = runs[runs["tags.scoresde.role"] == "parent"]
    assert len(parents) == 1 and parents.iloc[0]["status"] == "FINISHED"
    assert parents.iloc[0]["tags.prefect.flow_run_id"] == str(flow_run.id)
    children = runs[runs["tags.mlflow.parentRunId"] == parents.iloc[0]["run_id"]]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    from pipeline.dvcgraph import load_pipeline

    assert set(lock) == set(load_pipeline(repo).stages) and len(lock) >= 24  # every stage of the pipeline
    assert set(children["tags.dvc_stage"]) == set(lock)
    assert (children["status"] == "FINISHED").all()

    # Prefect artifacts: every stage ran once, and the report artifact is the pipeline's reports/report.md
    artifacts = read_artifacts(flow_run.id)
    rows = json.loads(artifacts["scoresde-stages"].data)
    assert {r["stage"] for r in rows} == set(lock) and {(r["action"], r["attempts"]) for r in rows} == {("ran", 1)}
    assert artifacts["scoresde-report"].data.strip() == (repo / "reports" / "report.md").read_text().strip()
    assert parents.iloc[0]["run_id"] in artifacts["scoresde-mlflow-run"].data
