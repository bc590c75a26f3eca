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
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        ensure_reachable(uri, timeout_s=2)


def test_slow_server_times_out_and_offline_fallback_uses_local_store(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _SlowHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(TrackingUnavailable, match="unreachable within 1 s"):
            configure({"uri": uri, "timeout_s": 1, "offline_fallback": False})
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


STAGE_SCRIPT = """
import pathlib, sys, time
from pipeline.tracking import stage_run
params = {"experiment": "reap", "seed": 0, "tracking": {"uri": sys.argv[1]}}
with stage_run(sys.argv[2], params) as run:
    pathlib.Path(sys.argv[3]).write_text(run.run_id)
    time.sleep(600)
"""


def test_reap_closes_runs_whose_heartbeat_stopped_from_any_host(tmp_path):
    """SIGKILL leaves a run RUNNING with a stale heartbeat: `reap` closes it; a live stage's run stays RUNNING."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    env = {**ENV, "MLFLOW_TRACKING_URI": uri, "SCORESDE_HEARTBEAT_S": "0.5", "SCORESDE_RUN_GROUP": "reap",
           "PYTHONPATH": str(root)}
    env.pop("SCORESDE_PARENT_RUN_ID", None)
    env.pop("DVC_STAGE", None)
    MlflowClient(uri).create_experiment("reap")  # one process creates the store (two at once race on its schema)
    procs = {name: subprocess.Popen([sys.executable, "stage.py", uri, name, f"{name}.id"], cwd=tmp_path, env=env)
             for name in ("victim", "live")}
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"{n}.id").exists() for n in procs):
            assert time.time() < deadline and all(p.poll() is None for p in procs.values()), "stages did not start"
            time.sleep(0.1)
        ids = {n: (tmp_path / f"{n}.id").read_text() for n in procs}
        procs["victim"].kill()
        procs["victim"].wait()
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("reap").experiment_id
        now_ms = int(time.time() * 1000)
        # another host's runs: a stale heartbeat, and no heartbeat with an old start (its pid is alive here)
        stale = client.create_run(exp, tags={"host": "elsewhere", "pid": str(os.getpid()),
                                             "scoresde.heartbeat": str(int(time.time()) - 100)}).info.run_id
        old = client.create_run(exp, start_time=now_ms - 100_000, tags={"host": "elsewhere"}).info.run_id
        time.sleep(6)  # the victim's last heartbeat is now >= 6 s old; the live stage beats every 0.5 s
        proc = subprocess.run([sys.executable, "-m", "pipeline.tracking", "reap", "--max-age-s", "4"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        status = {k: client.get_run(v).info.status for k, v in {**ids, "stale": stale, "old": old}.items()}
        assert status == {"victim": "KILLED", "live": "RUNNING", "stale": "KILLED", "old": "KILLED"}, status
        reason = client.get_run(ids["victim"]).data.tags["scoresde.end_reason"]
        assert "no heartbeat" in reason, reason
        assert "reaped 3 run(s)" in proc.stdout, proc.stdout
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_report_counts_only_finished_runs(tmp_path, monkeypatch):
    """RUNNING and KILLED runs are never a stage's result nor counted finished; superseded runs are skipped."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.report_data import fetch_runs, state_as_of

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("report-status")
    base = int(time.time() * 1000)

    def run(stage: str, group: str, status: str, offset: int, **tags) -> str:
        r = client.create_run(exp, start_time=base + offset, tags={"run_group": group, "stage": stage.split("@")[0],
                                                                    "dvc_stage": stage, **tags})
        if status != "RUNNING":
            client.set_terminated(r.info.run_id, status)
        return r.info.run_id

    earlier = run("toy", "g0", "FINISHED", 0)
    done = run("prepare", "g1", "FINISHED", 10)
    run("toy", "g1", "KILLED", 20)
    run("noise", "g1", "RUNNING", 30)
    run("train@ve", "g1", "KILLED", 40, **{"scoresde.superseded_by": "x"})
    synced = run("train@ve", "g1", "FINISHED", 50)
    runs, groups = fetch_runs("report-status")
    state = state_as_of(runs, groups, "g1")
    assert {k: v.run_id for k, v in state.items()} == {"prepare": done, "toy": earlier, "train@ve": synced}
    assert state["toy"].carried
    assert (groups["g1"].n_finished, groups["g1"].n_failed) == (2, 1)
