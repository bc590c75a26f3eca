"""A tracking server that dies mid-stage (SIGKILL), with and without `tracking.offline_fallback`.

With the fallback, `train@ve` finishes in the local store and `python -m pipeline.tracking sync` copies
its run to the restarted server (same store and port): params, metric histories with their steps, tags,
artifacts (keyed images, tables), dataset input and the registered model, counts equal, and a second
sync copies nothing. Without it, the stage fails within `tracking.timeout_s` of the server's death,
naming the URI, with none of its outputs written (both slow: a real server, SIGKILLed). Fast: a stage
that finds its server down at start logs locally, and `sync --to` copies the run to another store.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_mlflow_server import MlflowServer, artifact_files, e2e_module, run_env

STEPS = 60  # ~1 s a step on a busy 2-core machine: the server is killed after the first two loss points
BOOKKEEPING = {"mlflow.parentRunId", "scoresde.sync_to", "scoresde.offline_of", "scoresde.remote_parent",
               "scoresde.synced_from", "scoresde.synced_to_run"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny repository with `prepare` and `noise` done (tracking off), train@ve long enough to be killed."""
    e2e = e2e_module()

    def params_fn(params):
        p = e2e.tiny_params(params)
        p["train"]["ve"].update(steps=STEPS, log_every=2, ckpt_every=20)
        p["tracking"].update(timeout_s=10)
        return p

    repo = e2e.make_repo(tmp_path_factory.mktemp("sync"), params_fn=params_fn)
    env = {**e2e.env_for(repo), "SCORESDE_TRACKING": "off"}
    for stage in ("prepare", "noise"):
        subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env, check=True, capture_output=True,
                       timeout=600)
    return repo


def _copy(prepared: Path, dest: Path, fallback: bool) -> Path:
    repo = Path(shutil.copytree(prepared, dest, symlinks=True))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["tracking"]["offline_fallback"] = fallback
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def _train_then_kill(repo: Path, server: MlflowServer, group: str) -> tuple[subprocess.Popen, float, str]:
    """Start train@ve against the server; SIGKILL the server once the run has logged loss points."""
    from mlflow import MlflowClient

    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--sde", "ve"], cwd=repo,
                            env=run_env(repo, server.uri, group), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    client, deadline = MlflowClient(server.uri), time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        exp = client.get_experiment_by_name("e2e")
        runs = client.search_runs([exp.experiment_id], "tags.dvc_stage = 'train@ve'") if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 2:
            server.kill()
            return proc, time.time(), runs[0].info.run_id
        time.sleep(0.2)
    raise AssertionError("train@ve logged no loss in time")


def record(client, run_id: str) -> dict:
    """What a run holds, comparable between two stores."""
    run = client.get_run(run_id)
    return {
        "status": run.info.status,
        "name": run.info.run_name,
        "times": (run.info.start_time, run.info.end_time),
        "params": dict(run.data.params),
        "metrics": {k: sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, k))
                    for k in run.data.metrics},
        "tags": {k: v for k, v in run.data.tags.items() if k not in BOOKKEEPING},
        "artifacts": sorted(artifact_files(client, run_id)),
        "inputs": sorted((d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs),
        "versions": sorted((mv.name, mv.tags.get("dvc_stage"), mv.tags.get("git_commit"))
                           for mv in client.search_model_versions(f"run_id = '{run_id}'")),
    }


@pytest.mark.slow
def test_server_killed_mid_stage_fallback_then_sync(prepared, tmp_path):
    from mlflow import MlflowClient

    repo = _copy(prepared, tmp_path / "repo", fallback=True)
    server = MlflowServer(tmp_path / "server").start()
    try:
        proc, killed_at, remote_id = _train_then_kill(repo, server, "sync-group")
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        assert server.uri in err and "continues in the local store" in err, err[-4000:]
        assert (repo / "models/ve.pt").exists() and (repo / "reports/metrics/train_ve.json").exists()

        local = MlflowClient(f"sqlite:///{repo}/mlflow.db")
        (local_run,) = local.search_runs([local.get_experiment_by_name("e2e").experiment_id],
                                         "tags.dvc_stage = 'train@ve'")
        lid = local_run.info.run_id
        assert local_run.info.status == "FINISHED"
        assert local_run.data.tags["scoresde.sync_to"] == server.uri
        assert local_run.data.tags["scoresde.offline_of"] == remote_id
        steps = [m.step for m in local.get_metric_history(lid, "loss")]
        assert steps == list(range(2, STEPS + 1, 2)), steps  # the whole curve, before and after the failover
        before = record(local, lid)
        assert before["versions"] == [("scoresde-ve", "train@ve", local_run.data.tags["git_commit"])]
        assert any(a.startswith("tables/loss_ve") for a in before["artifacts"])

        server.start()  # same store, same port
        started = time.time()
        sync = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync"], cwd=repo,
                              env=run_env(repo, server.uri, "sync-group"), capture_output=True, text=True, timeout=600)
        sync_s = time.time() - started
        assert sync.returncode == 0, sync.stderr[-3000:]
        remote = MlflowClient(server.uri)
        exp_id = remote.get_experiment_by_name("e2e").experiment_id
        (synced,) = remote.search_runs([exp_id], f"tags.`scoresde.synced_from` = '{lid}'")
        rid = synced.info.run_id
        assert record(remote, rid) == before  # params, metric histories, tags, artifacts, inputs, model versions
        parent = remote.get_run(synced.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["scoresde.role"] == "parent" and parent.data.tags["run_group"] == "sync-group"
        original = remote.get_run(remote_id)
        assert original.info.status == "KILLED" and original.data.tags["scoresde.superseded_by"] == rid

        again = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync"], cwd=repo,
                               env=run_env(repo, server.uri, "sync-group"), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "0 item(s) copied" in again.stdout, again.stdout + again.stderr
        assert record(remote, rid) == before
        assert len(remote.search_runs([exp_id], f"tags.`scoresde.synced_from` = '{lid}'")) == 1

        # the report counts the synced run, not the superseded one
        import mlflow

        from pipeline.report_data import fetch_runs, state_as_of

        mlflow.set_tracking_uri(server.uri)
        runs, groups = fetch_runs("e2e")
        assert [r.run_id for r in runs if r.dvc_stage == "train@ve"] == [rid]
        assert state_as_of(runs, groups, "sync-group")["train@ve"].run_id == rid
        print(f"sync of {sum(len(v) for v in before['metrics'].values())} metric points, "
              f"{len(before['artifacts'])} artifacts: {sync_s:.1f} s")
    finally:
        server.stop()


@pytest.mark.slow
def test_server_killed_mid_stage_without_fallback_fails_within_bound(prepared, tmp_path):
    repo = _copy(prepared, tmp_path / "repo", fallback=False)
    server = MlflowServer(tmp_path / "server").start()
    try:
        proc, killed_at, _ = _train_then_kill(repo, server, "nofallback-group")
        out, err = proc.communicate(timeout=600)
        elapsed = time.time() - killed_at
    finally:
        server.stop()
    assert proc.returncode == 1, err[-4000:]
    assert server.uri in err and "was lost during stage train@ve" in err, err[-4000:]
    for out_path in ("models/ve.pt", "reports/metrics/train_ve.json", "reports/plots/loss_ve.csv"):
        assert not (repo / out_path).exists(), out_path
    leftovers = [p for folder in ("models", "reports") if (repo / folder).exists()
                 for p in (repo / folder).rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    assert not (repo / "mlflow.db").exists()  # nothing went to a local store
    print(f"stage failed {elapsed:.1f} s after the server's SIGKILL")


def test_server_down_at_start_fallback_then_sync_to_another_store(tmp_path, monkeypatch):
    """A stage that found its server down logs locally, marked for that server; `sync --to` copies it (fast)."""
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline import tracking_sync
    from pipeline.tracking import stage_run
    from test_mlflow_server import free_port

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "SCORESDE_PARENT_RUN_ID", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SCORESDE_RUN_GROUP", "down-group")
    dead = f"http://127.0.0.1:{free_port()}"
    pd.DataFrame({"image": [b"\x00"] * 3, "label": [0, 1, 2]}).to_parquet("data.parquet")
    params = {"experiment": "e2e", "seed": 0, "tracking": {"uri": dead, "timeout_s": 2, "offline_fallback": True}}
    with stage_run("prepare", params) as run:
        run.log_dataset("data.parquet", "toyset")
        for step in (1, 2, 3):
            run.log_metrics({"loss": 1.0 / step}, step=step)
        run.log_dict({"a": 1}, "metrics/prepare.json")
        lid = run.run_id
    local = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert local.get_run(lid).data.tags["scoresde.sync_to"] == dead
    before = record(local, lid)

    target = f"sqlite:///{tmp_path}/server.db"
    results = tracking_sync.sync(f"sqlite:///{tmp_path}/mlflow.db", to=target, log=lambda *_: None)
    assert [r.local_run for r in results] == [lid] and results[0].created and results[0].copied > 0
    remote = MlflowClient(target)
    rid = results[0].remote_run
    assert record(remote, rid) == before
    parent = remote.get_run(remote.get_run(rid).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["run_group"] == "down-group" and parent.data.tags["scoresde.role"] == "parent"
    again = tracking_sync.sync(f"sqlite:///{tmp_path}/mlflow.db", to=target, log=lambda *_: None)
    assert [(r.remote_run, r.created, r.copied) for r in again] == [(rid, False, 0)]
