"""Concurrency and service failures: two `dvc repro` at once, tracking servers that are down or slow."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from pipeline.tracking import DEFAULT_URI, TrackingUnavailable, configure, ensure_reachable

BIN = Path(sys.executable).parent
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_dvc_repro_at_once_second_fails_first_completes(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=tmp_path, check=True, env=ENV)
    (tmp_path / "slow.py").write_text(
        "import pathlib, time\n"
        "pathlib.Path('started').write_text('1')\n"
        "time.sleep(6)\n"
        "pathlib.Path('out.txt').write_text('done')\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  slow:\n    cmd: python slow.py\n    deps: [slow.py]\n    outs: [out.txt]\n")
    first = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and first.poll() is None, "first repro did not start its stage"
        time.sleep(0.1)
    second = subprocess.run([str(BIN / "dvc"), "repro"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=120)
    out1, _ = first.communicate(timeout=120)
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower(), second.stderr
    assert first.returncode == 0, out1
    assert (tmp_path / "out.txt").read_text() == "done"
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert "up to date" in status.stdout


class _SlowHealth(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        time.sleep(5)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_down_server_fails_within_bound_naming_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.time()
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        ensure_reachable(uri, timeout_s=2)
    assert time.time() - start < 5


def test_slow_server_times_out_and_offline_fallback_uses_local_store(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _SlowHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.chdir(tmp_path)
        start = time.time()
        with pytest.raises(TrackingUnavailable, match="unreachable within 1 s"):
            configure({"uri": uri, "timeout_s": 1, "offline_fallback": False})
        assert time.time() - start < 4
        assert configure({"uri": uri, "timeout_s": 1, "offline_fallback": True}) == DEFAULT_URI
    finally:
        server.shutdown()
        server.server_close()


def test_unsupported_uri_is_named():
    with pytest.raises(TrackingUnavailable, match="ftp://x"):
        ensure_reachable("ftp://x", 1)


def test_run_left_running_by_a_killed_stage_is_marked_killed(tmp_path, monkeypatch):
    """SIGKILL leaves an MLflow run RUNNING; the next start of that stage on this host closes it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import close_orphaned_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.set_experiment("orphans").experiment_id
    client = MlflowClient()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.kill()
    victim.wait()
    host = socket.gethostname()
    dead = client.create_run(exp, tags={"dvc_stage": "train@ve", "host": host, "pid": str(victim.pid)})
    alive = client.create_run(exp, tags={"dvc_stage": "train@ve", "host": host, "pid": str(os.getppid())})
    other_host = client.create_run(exp, tags={"dvc_stage": "train@ve", "host": "elsewhere", "pid": str(victim.pid)})
    other_stage = client.create_run(exp, tags={"dvc_stage": "train@vp", "host": host, "pid": str(victim.pid)})

    assert close_orphaned_runs(exp, "train@ve") == [dead.info.run_id]
    status = {r: client.get_run(r.info.run_id).info.status for r in (dead, alive, other_host, other_stage)}
    assert status[dead] == "KILLED" and "died" in client.get_run(dead.info.run_id).data.tags["scoresde.end_reason"]
    assert status[alive] == status[other_host] == status[other_stage] == "RUNNING"


def test_git_commit_is_dirty_for_source_changes_not_for_pipeline_outputs(tmp_path):
    """A reproduction rewrites the committed dvc.lock and reports/ as it runs: its stages stay 'clean'."""
    from pipeline.tracking import git_commit

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    (tmp_path / "reports").mkdir()
    for rel in ("dvc.lock", "reports/m.json", "stage.py"):
        (tmp_path / rel).write_text("0\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    head = git_commit(tmp_path)
    assert len(head) == 40 and not head.endswith("-dirty")
    (tmp_path / "dvc.lock").write_text("1\n")
    (tmp_path / "reports/m.json").write_text("1\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "stage.py").write_text("1\n")
    assert git_commit(tmp_path) == head + "-dirty"
