"""Wall time of a DVC pipeline via ``dvc repro`` and via the Prefect flow (``pipeline.flow``), in one run.

Both start from the same clean state: two fresh copies of the project (git-tracked files plus the
untracked, non-ignored ones; no DVC cache, no ``dvc.lock``, no outputs), and run-cache restores are
off (``dvc repro --no-run-cache`` / ``--no-run-cache``), so every stage really runs in both. The flow is
timed as a whole process (``python -m pipeline.flow``), i.e. including Prefect's start-up (an
ephemeral API unless ``PREFECT_API_URL`` is set) -- what a user waits for.

Run from the repository root:

    python benchmarks/orchestration.py                           # this repository (--project DIR: another)
    python benchmarks/orchestration.py --params tiny.yaml        # ... with another params.yaml
    python benchmarks/orchestration.py --synthetic --sleep 2     # a synthetic project (no torch)

Prints both wall times and their ratio (issue 5's target: flow <= 1.1 x dvc repro on 2 cores, and
faster when stages can run in parallel). Never asserted in tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}

# ---------------------------------------------------------------- synthetic project
STAGE_SCRIPT = '''\
"""A synthetic DVC stage: read inputs, optionally sleep / fail, write a JSON output."""
import argparse, json, os, sys, time

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("--inputs", nargs="*", default=[])
p.add_argument("--out", required=True)
p.add_argument("--metrics", default=None)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--fail-once", default=None, help="fail unless this marker file exists (then count attempts)")
p.add_argument("--always-fail", action="store_true")
p.add_argument("--mlflow", action="store_true", help="log a nested MLflow run via pipeline.tracking")
a = p.parse_args()

start = time.time()
root = os.environ.get("DVC_ROOT", os.getcwd())
with open(os.path.join(root, "runs.log"), "a") as log:     # which stages really ran (not tracked)
    log.write(a.name + "\\n")
if a.always_fail:
    for i in range(100):
        print(f"{a.name} progress line {i}")
    print(f"FATAL: {a.name} cannot continue", file=sys.stderr)
    sys.exit(3)
if a.fail_once:
    n = int(open(a.fail_once).read()) + 1 if os.path.exists(a.fail_once) else 1
    open(a.fail_once, "w").write(str(n))
    if n == 1:
        print(f"{a.name}: transient failure, attempt {n}", file=sys.stderr)
        sys.exit(1)
inputs = {}
for path in a.inputs:
    with open(path) as f:
        inputs[path] = json.load(f)["value"]
time.sleep(a.sleep)
value = sum(inputs.values()) + 1
record = {"name": a.name, "value": value, "start": start, "end": time.time(),
          "parent_run_id": os.environ.get("SCORESDE_PARENT_RUN_ID"),
          "run_group": os.environ.get("SCORESDE_RUN_GROUP"), "dvc_stage": os.environ.get("DVC_STAGE"),
          "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
if a.mlflow:
    sys.path.insert(0, root)
    import yaml
    from pipeline.tracking import stage_run
    params = yaml.safe_load(open(os.path.join(root, "params.yaml")))
    with stage_run(a.name, {"experiment": params["experiment"], "seed": 0}) as run:
        run.log_metrics({"value": value})
    record["mlflow_run_id"] = run.run_id
os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
with open(a.out, "w") as f:
    json.dump(record, f)
if a.metrics:
    os.makedirs(os.path.dirname(a.metrics) or ".", exist_ok=True)
    with open(a.metrics, "w") as f:
        json.dump({"value": value}, f)
print(f"{a.name}: wrote {a.out}")
'''


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args], cwd=cwd,
                   check=True, capture_output=True, text=True)


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the DVC CLI of this interpreter's environment."""
    exe = Path(sys.executable).parent / "dvc"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_synthetic_project(path: str | Path, *, items: tuple[str, ...] = ("a", "b"), sleep: float = 2.0,
                           flaky: bool = False, broken: bool = False, mlflow: bool = False,
                           prefect: dict | None = None, copy_pipeline: bool = False, commit: bool = True,
                           remote: str | Path | None = None) -> Path:
    """A tiny DVC project: prepare -> work@{items} (independent, ``sleep`` s each) -> report.

    ``flaky`` adds a stage failing on its first attempt; ``broken`` a stage that always fails after
    100 lines of output; ``mlflow`` makes every stage log a nested MLflow run via ``pipeline.tracking``;
    ``copy_pipeline`` copies this repository's ``pipeline/`` package and ``prefect.yaml`` into the
    project (to deploy it like the real one); ``remote`` adds a default DVC remote ``shared``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "scripts").mkdir(exist_ok=True)
    (path / "scripts" / "stage.py").write_text(STAGE_SCRIPT)
    mlflow_flag = " --mlflow" if mlflow else ""
    params = {"experiment": "synthetic", "seed": 0, "sleep": sleep, "items": list(items),
              "prefect": prefect if prefect is not None else {
                  "retries": 2, "retry_delay_seconds": [0.2, 0.5],
                  "stages": {"broken": {"retries": 1, "retry_delay_seconds": 0.1}}}}
    import yaml

    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    script = ["scripts/stage.py"]
    stages: dict = {
        "prepare": {"cmd": f"python scripts/stage.py prepare --out data/raw.json{mlflow_flag}",
                    "deps": script, "params": ["seed"], "outs": ["data/raw.json"]},
        "work": {"foreach": "${items}", "do": {
            "cmd": "python scripts/stage.py work@${item} --inputs data/raw.json --out data/work_${item}.json "
                   f"--sleep ${{sleep}}{mlflow_flag}",
            "deps": script + ["data/raw.json"], "params": ["sleep"], "outs": ["data/work_${item}.json"]}},
        "report": {"cmd": "python scripts/stage.py report --inputs "
                          + " ".join(f"data/work_{i}.json" for i in items)
                          + f" --out reports/report.json --metrics reports/metrics.json{mlflow_flag}",
                   "deps": script + [f"data/work_{i}.json" for i in items],
                   "outs": ["reports/report.json"], "metrics": [{"reports/metrics.json": {"cache": False}}]},
    }
    if flaky:
        stages["flaky"] = {"cmd": "python scripts/stage.py flaky --inputs data/raw.json --out data/flaky.json "
                                  "--fail-once flaky.marker",
                           "deps": script + ["data/raw.json"], "outs": ["data/flaky.json"]}
    if broken:
        stages["broken"] = {"cmd": "python scripts/stage.py broken --inputs data/raw.json --out data/broken.json "
                                   "--always-fail",
                            "deps": script + ["data/raw.json"], "outs": ["data/broken.json"]}
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (path / ".gitignore").write_text("runs.log\n*.marker\nmlflow.db\n__pycache__/\n")
    if copy_pipeline:
        shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"),
                        dirs_exist_ok=True)
        if (ROOT / "prefect.yaml").exists():
            shutil.copy2(ROOT / "prefect.yaml", path / "prefect.yaml")
    if not (path / ".git").exists():
        _git(path, "init", "-q")
    from dvc.repo import Repo  # the API: ~1 s faster per call than the CLI

    if not (path / ".dvc").exists():
        Repo.init(str(path)).close()
    with Repo(str(path)) as repo, repo.config.edit() as conf:  # == dvc config / dvc remote add -d
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
        if remote is not None:
            Path(remote).mkdir(parents=True, exist_ok=True)
            conf["remote"]["shared"] = {"url": str(Path(remote).resolve())}
            conf["core"]["remote"] = "shared"
    if commit:
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", "synthetic project")
    return path


# ---------------------------------------------------------------------- the benchmark
def fresh_copy(src: Path, dst: Path, params: Path | None) -> Path:
    """Copy the tracked + untracked-not-ignored files of ``src`` (no outputs, no cache, no dvc.lock)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.dvcgraph import load_pipeline

    outs = {out for spec in load_pipeline(src).stages.values() for out in spec.outs}
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        if rel == "dvc.lock" or rel.endswith("/dvc.lock"):
            continue
        if any(rel == out or rel.startswith(out.rstrip("/") + "/") for out in outs):
            continue  # a stage output left in the source checkout
        source = src / rel
        if not source.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (dst / ".dvc" / "cache").mkdir(parents=True, exist_ok=True)
    for tmp in ("tmp",):
        shutil.rmtree(dst / ".dvc" / tmp, ignore_errors=True)
    if params is not None:
        shutil.copy2(params, dst / "params.yaml")
    if not (dst / ".git").exists():
        _git(dst, "init", "-q")
    return dst


def _timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, proc


@contextlib.contextmanager
def prefect_server(workdir: Path, env: dict):
    """A Prefect server on 127.0.0.1:<free port> (its own PREFECT_HOME); yields its API URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = workdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    server_env = {**env, "PREFECT_HOME": str(home)}
    server_env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start:\n{(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def benchmark(project: Path, *, params: Path | None = None, max_workers: int | None = None,
              keep: bool = False, track: bool = True, server: bool = False) -> dict:
    bindir = Path(sys.executable).parent
    env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    work = Path(tempfile.mkdtemp(prefix="orchestration-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            if server:  # a long-running server, as in production: its start-up is not timed
                env["PREFECT_API_URL"] = stack.enter_context(prefect_server(work, env))
            return _benchmark(project, work, env, params=params, max_workers=max_workers, track=track,
                              server=server)
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _benchmark(project: Path, work: Path, env: dict, *, params: Path | None, max_workers: int | None,
               track: bool, server: bool) -> dict:
    bindir = Path(sys.executable).parent
    repro_dir = fresh_copy(project, work / "repro", params)
    flow_dir = fresh_copy(project, work / "flow", params)
    # Both write MLflow runs to their own fresh SQLite store (same cost for both).
    repro_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'repro.db'}"}
    flow_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'flow.db'}"}
    dvc_exe = str(bindir / "dvc") if (bindir / "dvc").exists() else "dvc"
    t_repro, p_repro = _timed([dvc_exe, "repro", "--no-run-cache"], repro_dir, repro_env)
    if p_repro.returncode != 0:
        raise RuntimeError(f"dvc repro failed:\n{p_repro.stdout[-3000:]}\n{p_repro.stderr[-3000:]}")
    flow_cmd = [sys.executable, "-m", "pipeline.flow", "--repo", str(flow_dir), "--no-run-cache"]
    if max_workers:
        flow_cmd += ["--max-workers", str(max_workers)]
    if not track:
        flow_cmd += ["--no-track"]
    t_flow, p_flow = _timed(flow_cmd, ROOT, flow_env)
    if p_flow.returncode != 0:
        raise RuntimeError(f"flow failed:\n{p_flow.stdout[-3000:]}\n{p_flow.stderr[-3000:]}")
    clean = dvc(flow_dir, "status").stdout.strip()
    inside = re.findall(r"pipeline finished in ([0-9.]+) s \(stages ([0-9.]+) s\)", p_flow.stdout + p_flow.stderr)
    return {"project": str(project), "params": str(params) if params else None,
            "dvc_repro_s": round(t_repro, 2), "flow_s": round(t_flow, 2), "ratio": round(t_flow / t_repro, 3),
            "flow_inside_s": float(inside[-1][0]) if inside else None,
            "flow_stages_s": float(inside[-1][1]) if inside else None,
            "prefect_api": "server (already running)" if server else "ephemeral (started by the flow)",
            "track": track, "max_workers": max_workers or os.cpu_count(), "cpus": os.cpu_count(),
            "flow_dvc_status": clean}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=str(ROOT), help="DVC project to copy (default: this repository)")
    parser.add_argument("--params", default=None, help="params.yaml to use in the copies (e.g. tiny params)")
    parser.add_argument("--synthetic", action="store_true", help="benchmark a synthetic project instead")
    parser.add_argument("--sleep", type=float, default=2.0, help="synthetic: seconds per independent stage")
    parser.add_argument("--items", type=int, default=2, help="synthetic: number of independent stages")
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--no-track", action="store_true", help="flow without MLflow parent run")
    parser.add_argument("--server", action="store_true",
                        help="run the flow against a Prefect server started beforehand (untimed) instead of an "
                             "ephemeral API started by the flow process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    tmp = None
    project = Path(args.project).resolve()
    if args.synthetic:
        tmp = Path(tempfile.mkdtemp(prefix="synthetic-project-"))
        items = tuple(chr(ord("a") + i) for i in range(args.items))
        project = make_synthetic_project(tmp / "project", items=items, sleep=args.sleep)
    try:
        result = benchmark(project, params=Path(args.params).resolve() if args.params else None,
                           max_workers=args.max_workers, keep=args.keep, track=not args.no_track,
                           server=args.server)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"project        {result['project']}" + (f" (params {result['params']})" if result["params"] else ""))
        print(f"dvc repro      {result['dvc_repro_s']:8.2f} s")
        print(f"prefect flow   {result['flow_s']:8.2f} s   (max_workers={result['max_workers']}, {result['cpus']} CPUs, "
              f"Prefect API: {result['prefect_api']}, MLflow parent run: {result['track']})")
        if result["flow_inside_s"] is not None:
            print(f"  of which     {result['flow_inside_s']:8.2f} s   inside the flow function (MLflow parent run, DVC graph, stages)")
            print(f"  of which     {result['flow_stages_s']:8.2f} s   running the stages (commands + DVC status/commit)")
        print(f"ratio          {result['ratio']:8.3f}   (flow / dvc repro; target <= 1.1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
