"""Losing a Prefect worker in the middle of a training stage, then running the deployment again (slow).

Real components only, all on 127.0.0.1 (free ports), offline: ``prefect server start`` (the fixture of
tests/test_prefect_deployment.py), an MLflow tracking server, a process work pool, this repository's
``prefect.yaml`` deployed from a temp copy of the repository with tiny params (tests/test_pipeline_e2e.py)
and ``prefect worker start``. The flow runs ``targets=[train@ve]`` (prepare -> noise -> train@ve), with
train@ve long enough (400 steps, a checkpoint every 20) to be caught mid-way.

1. The first flow run: once train@ve has written a checkpoint, the worker, its flow-run process and
   the training process are SIGKILLed (every process group under the worker): a lost host.
2. Prefect notices through flow-run heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30``) and the
   "detect zombie flows" automation of Prefect's docs (``pipeline.flow_tracking.create_zombie_automation``,
   ``within`` 60 s here): the run becomes CRASHED.
3. The deployment runs again on a new worker: prepare and noise are skipped (DVC: up to date),
   train@ve resumes from its newest checkpoint, the run completes, ``dvc status`` of the target and
   its upstream is clean, and no MLflow run is left RUNNING (the second flow closed the first one's
   parent run and its training run as KILLED: their processes are gone). The second run's Prefect
   artifacts hold the stage table and a link to its MLflow parent run on the tracking server.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pipeline.flow_tracking import create_zombie_automation  # noqa: E402
from test_prefect_deployment import (  # noqa: E402,F401  (server/api: fixtures, used by name)
    BIN, api, flow_run_state, free_port, prefect_cli, read_artifacts, server, stop, wait_http,
)

pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 400, 20


def _e2e():
    spec = importlib.util.spec_from_file_location("pipeline_e2e", ROOT / "tests" / "test_pipeline_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1:<free port> (one worker, SQLite store, proxied artifacts)."""
    port = free_port()
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    log = folder / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'srv.db'}",
                                 "--artifacts-destination", str(folder / "artifacts")],
                                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process, every descendant and their process groups (the flow-run process is started in a
    session of its own); returns the pids killed."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    own_group = os.getpgid(0)
    groups = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            groups.add(os.getpgid(proc.pid))
    for group in groups - {own_group}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not seen within {timeout} s")


def test_lost_worker_then_rerun_resumes_training_and_leaves_no_running_mlflow_run(api, mlflow_server, tmp_path):
    from prefect.deployments import run_deployment

    e2e = _e2e()

    def params_fn(params: dict) -> dict:
        p = e2e.tiny_params(params)
        p["cpu_threads"] = 1  # one torch thread: no thread fight on a small shared machine
        p["train"]["ve"].update(steps=STEPS, ckpt_every=CKPT_EVERY, log_every=20)
        p["prefect"] = {**(p.get("prefect") or {}), "retries": 0}
        return p

    repo = tmp_path / "repo"
    repo.mkdir()
    e2e.make_repo(repo, params_fn=params_fn)
    (repo / "prefect.yaml").write_text((ROOT / "prefect.yaml").read_text())
    prefect_cli(api, "work-pool", "create", "local", "--type", "process", "--overwrite", cwd=tmp_path)
    prefect_cli(api, "--no-prompt", "deploy", "--name", "local", cwd=repo)
    create_zombie_automation(within_s=60)  # Prefect's zombie-flow automation

    env = {k: v for k, v in e2e.env_for(repo).items() if k != "SCORESDE_RUN_GROUP"}
    worker_env = {**api["env"], **env, "SCORESDE_REPO": str(repo), "MLFLOW_TRACKING_URI": mlflow_server,
                  "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    parameters = {"targets": ["train@ve"], "max_workers": 1}
    started = time.perf_counter()

    # ---- 1. first run, killed with its worker once train@ve has a checkpoint
    first = run_deployment("reproduce/local", parameters=parameters, timeout=0)
    with open(tmp_path / "worker-1.log", "w") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local", "--run-once"],
                                  cwd=tmp_path, env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    ckpt_dir = repo / "checkpoints" / "ve"
    try:
        def checkpoint():
            assert worker.poll() is None, (tmp_path / "worker-1.log").read_text()[-4000:]
            return sorted(ckpt_dir.glob("ckpt_*.pt"))
        _wait_for(checkpoint, 900, "a train@ve checkpoint")
        killed = _kill_tree(worker.pid)
    finally:
        stop(worker)
    killed_at = time.perf_counter()
    steps_at_kill = sorted(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("ckpt_*.pt"))
    assert steps_at_kill and steps_at_kill[-1] < STEPS, steps_at_kill
    assert not (repo / "models" / "ve.pt").exists(), "train@ve finished before the kill"
    assert len(killed) >= 3, killed  # worker, flow-run process, training process (at least)
    assert flow_run_state(first.id)[0] == "RUNNING"  # nobody told Prefect

    # ---- 2. the deployment again, on a new worker
    second = run_deployment("reproduce/local", parameters=parameters, timeout=0)
    log = tmp_path / "worker-2.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local", "--run-once"],
                                  cwd=tmp_path, env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        worker.wait(timeout=900)
    finally:
        stop(worker)
    state, message = flow_run_state(second.id)
    assert state == "COMPLETED", f"{state}: {message}\n{log.read_text()[-4000:]}"

    # DVC: finished stages skipped, the target and its upstream recorded
    artifacts = read_artifacts(second.id)
    rows = {r["stage"]: r for r in json.loads(artifacts["scoresde-stages"].data)}
    assert {n: r["action"] for n, r in rows.items()} == {"prepare": "skipped", "noise": "skipped", "train@ve": "ran"}
    assert rows["train@ve"]["attempts"] == 1
    status = e2e.dvc(repo, "status", "--json", "--with-deps", "train@ve")
    assert json.loads(status.stdout or "{}") == {}, status.stdout

    # the training resumed from the checkpoint of the killed run
    metrics = json.loads((repo / "reports" / "metrics" / "train_ve.json").read_text())
    assert metrics["steps"] == STEPS and metrics["resumed_from_step"] in steps_at_kill, (metrics, steps_at_kill)
    stage_log = (repo / ".dvc" / "tmp" / "flow-logs" / "train@ve.log").read_text()
    assert f"(resumed from step {metrics['resumed_from_step']})" in stage_log
    bars = [line for line in stage_log.splitlines() if line.startswith("train:")]
    assert 1 <= len(bars) <= metrics["seconds"] / 10 + 3, bars  # the progress bar: ~one record per 10 s

    # MLflow: nothing left RUNNING; the lost flow's parent and training runs closed as KILLED
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert not (runs["status"] == "RUNNING").any(), runs[["run_id", "tags.mlflow.runName", "status"]]
    parents = runs[runs["tags.scoresde.role"] == "parent"].set_index("tags.prefect.flow_run_id")
    lost, rerun = parents.loc[str(first.id)], parents.loc[str(second.id)]
    assert lost["status"] == "KILLED" and "is gone" in lost["tags.scoresde.end_reason"]
    assert rerun["status"] == "FINISHED"
    lost_children = runs[runs["tags.mlflow.parentRunId"] == lost["run_id"]]
    lost_train = lost_children[lost_children["tags.dvc_stage"] == "train@ve"]
    assert len(lost_train) == 1 and lost_train.iloc[0]["status"] == "KILLED"
    assert set(lost_children[lost_children["tags.dvc_stage"] != "train@ve"]["status"]) == {"FINISHED"}
    rerun_children = runs[runs["tags.mlflow.parentRunId"] == rerun["run_id"]]
    assert list(rerun_children["tags.dvc_stage"]) == ["train@ve"]  # skipped stages log no run

    # the MLflow link artifact points at the rerun's parent run on the tracking server
    link = artifacts["scoresde-mlflow-run"]
    assert link.type == "markdown"  # what create_link_artifact stores: "[text](url)"
    url = re.fullmatch(r"\[.*\]\((.+)\)", link.data).group(1)  # stored as "[text](url)"
    assert url == f"{mlflow_server}/#/experiments/{rerun['experiment_id']}/runs/{rerun['run_id']}"
    with urllib.request.urlopen(url.split("#")[0], timeout=10) as resp:
        assert resp.status == 200

    # Prefect: the lost run was set CRASHED by the zombie automation (no heartbeat for 60 s)
    state = _wait_for(lambda: flow_run_state(first.id)[0] == "CRASHED" and "CRASHED",
                      max(10.0, 240 - (time.perf_counter() - killed_at)), "the lost flow run CRASHED", poll=2)
    assert state == "CRASHED"
    print(f"worker-loss test: {time.perf_counter() - started:.0f} s from the first run; killed at checkpoint "
          f"steps {steps_at_kill}; resumed from step {metrics['resumed_from_step']}; Prefect marked the lost run "
          f"CRASHED {time.perf_counter() - killed_at:.0f} s after the kill at the latest")
