"""MLflow's native records of the stages, against SQLite (fast) and a real `mlflow server` over HTTP (slow).

Fast: the dvc.yaml outputs the harness logs per stage; a stage run logs its PNG outputs as keyed images,
its CSV / Parquet outputs as tables, the dataset input with the file's md5, system metrics (train/sample),
the model as a registered pyfunc that samples. Slow: the tiny pipeline (`dvc repro`) against a real
server (SQLite backend, proxied artifacts) - runs per stage, metrics, keyed images, tables, registered
model versions with their dvc.lock hash and git commit, the report on the parent run, and
`python -m pipeline.report` rebuilding the report from the server.
"""
from __future__ import annotations

import hashlib
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ a real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, ``--serve-artifacts`` into ``folder/artifacts``).

    Started in its own session so that :meth:`kill` reaches the uvicorn worker too (SIGKILL to the group);
    :meth:`start` again reuses the same store and port.
    """

    def __init__(self, folder: Path, port: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "MlflowServer":
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server {self.uri} not healthy within {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.time() + 30
        while time.time() < deadline:  # the port is closed once the worker is gone too
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    stop = kill


def e2e_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_e2e", ROOT / "tests" / "test_pipeline_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_env(repo: Path, uri: str, group: str) -> dict:
    env = e2e_module().env_for(repo)
    env.update(MLFLOW_TRACKING_URI=uri, SCORESDE_RUN_GROUP=group)
    return env


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for info in client.list_artifacts(run_id, path):
        out += artifact_files(client, run_id, info.path) if info.is_dir else [info.path]
    return out


def image_keys(files: list[str]) -> set[tuple[str, int]]:
    """(key, step) of the keyed images among a run's artifact files (``images/<key>+step+<n>+...png``)."""
    keys = set()
    for f in files:
        if f.startswith("images/") and f.endswith(".png") and "+step+" in f:
            parts = f[len("images/"):].split("+")
            keys.add((parts[0], int(parts[2])))
    return keys


# ------------------------------------------------------------------ fast: SQLite
def test_declared_outputs_from_dvc_yaml(tmp_path):
    from pipeline.tracking_outputs import declared_outputs

    outs = declared_outputs("train@ve", ROOT / "dvc.yaml")
    assert "models/ve.pt" in outs and "reports/metrics/train_ve.json" in outs
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"folder": "reports"}], "stages": {
        "one": {"cmd": "true", "outs": ["${folder}/one.png", {"data/x.parquet": {"cache": False}}],
                "metrics": [{"${folder}/one.json": {"cache": False}}]},
        "many": {"foreach": "${params.list}", "do": {"cmd": "true", "plots": [{"p/${item}.csv": {"x": "a"}}]}},
        "keyed": {"foreach": {"a": {"n": 1}}, "do": {"cmd": "true", "outs": ["k/${key}_${item.n}.png"]}}}}))
    assert declared_outputs("one", tmp_path / "dvc.yaml") == ["reports/one.png", "data/x.parquet", "reports/one.json"]
    assert declared_outputs("many@0.01", tmp_path / "dvc.yaml") == ["p/0.01.csv"]
    assert declared_outputs("keyed@a", tmp_path / "dvc.yaml") == ["k/a_1.png"]
    assert declared_outputs("many", tmp_path / "dvc.yaml") == []  # a foreach stage needs its item
    assert declared_outputs("nothing", tmp_path / "dvc.yaml") == []


def test_stage_run_logs_images_tables_dataset_and_system_metrics(tmp_path, monkeypatch):
    """The harness's records of a stage, in a SQLite store: keyed images, tables, dataset input, system metrics."""
    import numpy as np
    import pandas as pd
    from matplotlib import pyplot as plt
    from mlflow import MlflowClient

    from pipeline.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("SCORESDE_RUN_GROUP", "g1")
    monkeypatch.delenv("SCORESDE_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({
        "vars": [{"kinds": ["a"]}],
        "stages": {"train": {"foreach": "${kinds}", "do": {
            "cmd": "true", "outs": ["out/${item}.png", {"out/table_${item}.parquet": {"cache": False}}],
            "plots": [{"out/curve_${item}.csv": {"x": "step"}}]}}}}))
    Path("out").mkdir()
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig("out/a.png")
    plt.close(fig)
    pd.DataFrame({"step": [0, 1, 2], "loss": [3.0, 2.0, 1.0]}).to_csv("out/curve_a.csv", index=False)
    pd.DataFrame({"x": [b"\x00\x01", b"\x02"], "label": [1, 2]}).to_parquet("out/table_a.parquet")
    pd.DataFrame({"image": [np.zeros(4, np.uint8).tobytes()] * 3, "label": [0, 1, 2]}).to_parquet("data.parquet")

    params = {"experiment": "native", "seed": 0, "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    with stage_run("train@a", params, sde="a") as run:
        run.log_dataset("data.parquet", "toyset")
        for step in range(3):
            run.log_metrics({"loss": 3.0 - step}, step=step)
        time.sleep(2.5)  # system metrics are sampled every second
        run_id = run.run_id

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED"
    files = artifact_files(client, run_id)
    assert image_keys(files) == {("a", 2)}  # key = file stem, step = the run's last metric step
    assert "tables/curve_a.json" in files and "tables/table_a.json" in files
    table = json.loads(Path(client.download_artifacts(run_id, "tables/table_a.json", str(tmp_path))).read_text())
    assert table["columns"] == ["label"]  # binary columns are left out of the table
    (ds,) = r.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("toyset", md5(tmp_path / "data.parquet"))
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert any(k.startswith("system/cpu") for k in r.data.metrics), sorted(r.data.metrics)
    assert float(r.data.tags["scoresde.heartbeat"]) >= r.info.start_time / 1000 - 1


def test_tracking_off_runs_no_mlflow_code(tmp_path):
    """NullRun's native-feature methods are no-ops (a machine without MLflow)."""
    from pipeline.tracking import NullRun

    run = NullRun()
    run.log_dataset(tmp_path / "x.parquet", "x")
    run.log_image(tmp_path / "x.png")
    run.log_table(tmp_path / "x.csv")
    assert run.log_model(tmp_path / "x.pt", "ve") is None
    run.log_to_parent(tmp_path / "r.html", "report")
    run.log_outputs("train@ve")
    run.close()


# ------------------------------------------------------------------ slow: the tiny pipeline over HTTP
@pytest.mark.slow
def test_tiny_pipeline_against_a_real_mlflow_server(tmp_path):
    from mlflow import MlflowClient

    e2e = e2e_module()
    server = MlflowServer(tmp_path / "server").start()
    try:
        (tmp_path / "repo").mkdir()
        repo = e2e.make_repo(tmp_path / "repo")
        env = run_env(repo, server.uri, "srv-group")
        started = time.time()
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        repro_s = time.time() - started
        sync = subprocess.run([sys.executable, "-m", "pipeline.tracking", "sync-lock"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stderr
        print(f"dvc repro of the tiny pipeline against {server.uri}: {repro_s:.0f} s")

        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("e2e")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        (parent,) = [r for r in runs if r.data.tags.get("scoresde.role") == "parent"]
        children = {r.data.tags["dvc_stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert set(children) == set(lock)
        assert all(r.info.status == "FINISHED" for r in children.values())

        from pipeline.tracking import lock_hashes

        hashes = lock_hashes(repo / "dvc.lock")
        kinds = sorted(name.split("@")[1] for name in lock if name.startswith("train@"))
        for name, entry in lock.items():
            run = children[name]
            assert run.data.tags["dvc_lock_md5"] == hashes[name]
            files = artifact_files(client, run.info.run_id)
            for out in entry.get("outs", []):
                path = Path(out["path"])
                if path.suffix == ".png":
                    assert path.stem in {k for k, _ in image_keys(files)}, (name, path, files)
                elif path.suffix in (".csv", ".parquet"):
                    assert f"tables/{path.stem}.json" in files, (name, path, files)
        for kind in kinds:
            train = children[f"train@{kind}"]
            history = client.get_metric_history(train.info.run_id, "loss")
            assert len(history) >= 2 and history[-1].step > history[0].step
            for stage in (f"train@{kind}", f"sample@{kind}"):
                assert any(k.startswith("system/") for k in children[stage].data.metrics), stage
            (ds,) = train.inputs.dataset_inputs
            assert ds.dataset.digest == md5(repo / "data/prepared/data.parquet")
            versions = client.search_model_versions(f"name = 'scoresde-{kind}'")
            (mv,) = [v for v in versions if v.run_id == train.info.run_id]
            assert mv.tags["dvc_lock_md5"] == hashes[f"train@{kind}"]
            assert mv.tags["git_commit"] == train.data.tags["git_commit"] and mv.tags["dvc_stage"] == f"train@{kind}"
        assert children["prepare"].inputs.dataset_inputs[0].dataset.digest == md5(repo / "data/prepared/data.parquet")
        assert {"report/report.html", "report/report.md"} <= set(artifact_files(client, parent.info.run_id))

        # the registered model samples (pyfunc, CPU, nothing downloaded)
        import mlflow.pyfunc
        import pandas as pd

        mlflow.set_tracking_uri(server.uri)
        model = mlflow.pyfunc.load_model(f"models:/scoresde-{kinds[0]}/latest")
        x = model.predict(pd.DataFrame({"n": [2], "seed": [0]}))
        assert x.shape[0] == 2 and x.dtype.name == "float32"

        # the report rebuilt from the server alone
        out = tmp_path / "rebuilt"
        rebuilt = subprocess.run([sys.executable, "-m", "pipeline.report", "--experiment", "e2e", "--out", str(out),
                                  "--figures", str(tmp_path / "none")], cwd=repo, env=env, capture_output=True,
                                 text=True, timeout=600)
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        md = (out / "report.md").read_text()
        assert "srv-group" in md and (out / "report.html").stat().st_size > 1000
    finally:
        server.stop()
