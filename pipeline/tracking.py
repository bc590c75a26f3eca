"""MLflow tracking for pipeline stages.

One experiment per ``params.experiment``. The stage runs of one reproduction are nested under a
parent run: the Prefect flow creates it and hands its id to every stage through
``SCORESDE_PARENT_RUN_ID``; under plain ``dvc repro`` each stage finds (or creates) the parent run of
its run group, ``SCORESDE_RUN_GROUP`` (``make repro`` sets a fresh one per reproduction; otherwise
the group is derived from the git commit and the params file, so reruns of one configuration group
together).

Every stage run carries the tags the comparison report queries: ``stage``, ``sde``, ``dvc_stage``,
``run_group``, ``git_commit``, ``seed`` and package versions; ``dvc_lock_md5`` (the hash of the
stage's entry in dvc.lock) is attached once DVC has written the lock entry, by :func:`sync_lock_tags`.

The tracking server is checked *before* a stage starts its work: an unreachable or slow server fails
within ``tracking.timeout_s`` seconds with the URI in the message, or, with
``tracking.offline_fallback: true``, the stage logs to the local SQLite store and says so. A server that
dies *during* a stage is handled by :class:`pipeline.tracking_run.StageRun` the same way (fail naming the
URI, or continue in the local store); ``python -m pipeline.tracking sync`` later copies the local runs to
the server (:mod:`pipeline.tracking_sync`), ``python -m pipeline.tracking reap`` closes as KILLED the
RUNNING runs whose heartbeat stopped.

Beyond params, metrics and artifacts, a stage run carries MLflow's native records: every PNG the stage
declares in dvc.yaml as a keyed image, every CSV / Parquet output as a table, the prepared dataset as an
input (prepare, train), system metrics (train, sample), the trained model as a registered pyfunc
(``scoresde-<kind>``, :mod:`pipeline.mlflow_model`), and the report on the reproduction's parent run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from pipeline import env
from pipeline.env import (
    DVC_STAGE, MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_TRACKING_URI, PARENT_RUN_ID,
    RUN_GROUP, quiet_telemetry,
)

DEFAULT_URI = "sqlite:///mlflow.db"

# Quiet, offline-friendly MLflow defaults (set before mlflow is imported anywhere in the process).
quiet_telemetry()


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached."""


_FALLBACK_FROM: str | None = None  # the server the last configure() fell back from (local runs to sync there)


def __getattr__(name: str):  # StageRun / NullRun live in pipeline.tracking_run (imported on first use)
    if name in ("StageRun", "NullRun"):
        from pipeline import tracking_run

        return getattr(tracking_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ run context
def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        # Dirty = source changes. dvc.lock and reports/ are the pipeline's own committed outputs: a
        # reproduction rewrites them as it goes, which must not mark its own later stages "-dirty".
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)dvc.lock", ":(exclude)reports"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def package_versions() -> dict[str, str]:
    names = ["torch", "torchvision", "torch-fidelity", "numpy", "scipy", "pandas", "pyarrow",
             "mlflow", "dvc", "prefect", "scoresde"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not-installed"
    return versions


def params_digest(params_file: str | Path = "params.yaml") -> str:
    path = Path(params_file)
    return hashlib.md5(path.read_bytes()).hexdigest() if path.exists() else "noparams"


def run_group() -> str:
    """The reproduction this process belongs to (see module docstring)."""
    group = os.environ.get(RUN_GROUP)
    if group:
        return group
    return f"git{git_commit()[:8]}-params{params_digest()[:8]}"


# --------------------------------------------------------------- URI handling
def resolve_uri(tracking: dict | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` wins over ``params.tracking.uri``; default is the local SQLite store."""
    return os.environ.get(MLFLOW_TRACKING_URI) or (tracking or {}).get("uri") or DEFAULT_URI


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, naming ``uri``, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user-configured URI
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {uri} answered HTTP {resp.status} on /health")
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is unreachable within {timeout_s:g} s ({reason}); start it, fix "
                f"MLFLOW_TRACKING_URI / params tracking.uri, or set tracking.offline_fallback: true") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        folder = db.parent if str(db.parent) else Path(".")
        if not folder.exists() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(f"MLflow tracking store {uri}: folder {folder} does not exist or is not writable")
    elif uri.startswith("databricks"):
        pass  # authenticated remote stores are checked by MLflow itself
    else:
        raise TrackingUnavailable(f"MLflow tracking URI {uri!r} is not supported here: use sqlite:///FILE or http(s)://HOST:PORT")


def configure(tracking: dict | None = None) -> str:
    """Resolve, check and activate the tracking URI; returns the URI in use."""
    global _FALLBACK_FROM
    tracking = tracking or {}
    uri = resolve_uri(tracking)
    timeout = float(tracking.get("timeout_s", 10.0))
    # Bound every later HTTP call as well, so a server dying mid-stage cannot hang it for minutes: a refused
    # connection fails after 2 retries in ~2.5 s (backoff 0 + 2 s, jitter <= 0.5 s), a hung one per timeout.
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_TIMEOUT, str(int(max(timeout, 1))))
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES, "2")
    os.environ.setdefault(env.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, "1")
    os.environ.setdefault(env.MLFLOW_HTTP_REQUEST_BACKOFF_JITTER, "0.5")
    _FALLBACK_FROM = None
    try:
        ensure_reachable(uri, timeout)
    except TrackingUnavailable as err:
        if not tracking.get("offline_fallback", False):
            raise
        print(f"[tracking] {err}\n[tracking] offline_fallback: logging to the local store {DEFAULT_URI} instead; "
              "`python -m pipeline.tracking sync` copies the runs to the server later", file=sys.stderr)
        _FALLBACK_FROM = uri if uri.startswith(("http://", "https://")) else None
        uri = DEFAULT_URI
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


# ------------------------------------------------------------------- parents
def _experiment_id(experiment: str) -> str:
    import mlflow

    return mlflow.set_experiment(experiment).experiment_id


def start_parent_run(experiment: str, run_group: str, tags: dict | None = None, *, terminate: bool = False) -> str:
    """Create the parent run of one reproduction; returns its run id.

    The Prefect flow keeps it RUNNING until the flow ends (``end_parent_run``); ``terminate=True``
    closes it at once (the ``dvc repro`` case, where children attach to it later).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    all_tags = {"scoresde.role": "parent", "run_group": run_group, "git_commit": git_commit(),
                **{f"version.{k}": v for k, v in package_versions().items()}, **(tags or {})}
    run = client.create_run(_experiment_id(experiment), run_name=f"repro-{run_group}",
                            tags={k: str(v) for k, v in all_tags.items()})
    if terminate:
        client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def end_parent_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status)


def find_or_create_parent(experiment: str, group: str) -> str:
    import mlflow

    exp_id = _experiment_id(experiment)
    found = mlflow.search_runs([exp_id], filter_string=f"tags.run_group = '{group}' and tags.`scoresde.role` = 'parent'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if len(found):
        return found.iloc[0]["run_id"]
    return start_parent_run(experiment, group, terminate=True)


# ---------------------------------------------------------------- stage runs
@contextlib.contextmanager
def stage_run(stage: str, params: dict, *, sde: str | None = None, extra_tags: dict | None = None) -> Iterator[Any]:
    """Open the MLflow run of one stage, nested under the reproduction's parent run.

    Logs the resolved params (flattened) and a ``run_info.json`` (params, seed, git commit, versions);
    after the body, the stage's declared PNG / CSV / Parquet outputs as images and tables; marks the run
    FAILED if the body raises (KILLED on Ctrl-C). The handle is a :class:`pipeline.tracking_run.StageRun`.
    """
    from pipeline.tracking_run import StageRun, system_metrics_wanted

    global _FALLBACK_FROM
    tracking = params.get("tracking") or {}
    fallback = bool(tracking.get("offline_fallback", False))
    uri = configure(tracking)
    experiment = params.get("experiment", "scoresde")
    run_name = stage if sde is None or "@" in stage else f"{stage}@{sde}"
    system_metrics = system_metrics_wanted(stage)
    try:
        active, tags, parent = _open_stage_run(stage, params, uri, sde, run_name, system_metrics, extra_tags)
    except TrackingUnavailable as err:  # the server died between the check and the run's creation
        if not fallback:
            raise
        print(f"[tracking] {err}\n[tracking] offline_fallback: logging to the local store {DEFAULT_URI} instead",
              file=sys.stderr)
        import mlflow

        _FALLBACK_FROM, uri = uri, DEFAULT_URI
        mlflow.set_tracking_uri(uri)
        active, tags, parent = _open_stage_run(stage, params, uri, sde, run_name, system_metrics, extra_tags)
    handle = StageRun(active.info.run_id, stage, sde, uri=uri, experiment=experiment, parent_run_id=parent,
                      tags=tags, fallback=fallback, timeout_s=float(tracking.get("timeout_s", 10.0)),
                      start_time=active.info.start_time, run_name=run_name, fluent=True, system_metrics=system_metrics)
    handle.start_heartbeat()
    status = "FAILED"
    try:
        handle.log_params({k: v for k, v in params.items() if k != "tracking"})
        handle.log_dict({"stage": stage, "sde": sde, "params": params, "tags": tags}, "run_info.json")
        yield handle
        handle.log_outputs(tags["dvc_stage"])
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        handle.close(status)


def _open_stage_run(stage, params, uri, sde, run_name, system_metrics, extra_tags):
    """Parent, experiment, orphans, then ``mlflow.start_run``; a server lost meanwhile is TrackingUnavailable."""
    import mlflow

    from pipeline.tracking_run import HEARTBEAT_TAG, SYNC_TO_TAG

    try:
        experiment = params.get("experiment", "scoresde")
        group = run_group()
        parent = os.environ.get(PARENT_RUN_ID)
        if _FALLBACK_FROM and uri == DEFAULT_URI:  # a parent id handed down lives on the unreachable server
            parent = None
        parent = parent or find_or_create_parent(experiment, group)
        exp_id = _experiment_id(experiment)
        tags = {
            "stage": stage.split("@")[0],
            "sde": sde or "none",
            "dvc_stage": os.environ.get(DVC_STAGE, stage),
            "run_group": group,
            "git_commit": git_commit(),
            "seed": params.get("seed", "none"),
            "tracking_uri": uri,
            **{f"version.{k}": v for k, v in package_versions().items()},
            **(extra_tags or {}),
        }
        tags.update(host=socket.gethostname(), pid=os.getpid(), **{HEARTBEAT_TAG: f"{time.time():.3f}"})
        if _FALLBACK_FROM:
            tags[SYNC_TO_TAG] = _FALLBACK_FROM
        close_orphaned_runs(exp_id, tags["dvc_stage"])
        active = mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent,
                                  tags={k: str(v) for k, v in tags.items()}, log_system_metrics=system_metrics)
    except Exception as err:
        if isinstance(err, TrackingUnavailable) or not uri.startswith(("http://", "https://")):
            raise
        try:
            ensure_reachable(uri, 5.0)
        except TrackingUnavailable:
            raise TrackingUnavailable(f"MLflow tracking server {uri} was lost while opening the run of {stage} "
                                      f"({str(err).splitlines()[0][:200]})") from None
        raise
    return active, tags, parent


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave it alone
    return True


def close_orphaned_runs(experiment_id: str, dvc_stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``dvc_stage`` started on this host by a process that is gone.

    A stage killed with SIGKILL (OOM killer, preemption) never closes its MLflow run; without this it
    would stay RUNNING for ever and look alive in the UI and the report. Returns the run ids closed.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    query = (f"attributes.status = 'RUNNING' and tags.dvc_stage = '{dvc_stage}' and tags.host = '{host}'")
    closed = []
    for r in client.search_runs([experiment_id], filter_string=query, max_results=100):
        pid = r.data.tags.get("pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_tag(r.info.run_id, "scoresde.end_reason", f"process {pid} on {host} died without closing the run")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
            print(f"[tracking] run {r.info.run_id} of {dvc_stage} was left RUNNING by a dead process ({pid}): "
                  "marked KILLED", file=sys.stderr)
    return closed


# --------------------------------------------------------- dvc.lock hashes
def lock_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """md5 of each stage's entry in dvc.lock (canonical JSON), keyed by stage name (``train@ve``)."""
    import yaml

    path = Path(lock_file)
    if not path.exists():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {name: hashlib.md5(json.dumps(entry, sort_keys=True).encode()).hexdigest() for name, entry in stages.items()}


def sync_lock_tags(experiment: str, group: str | None = None, lock_file: str | Path = "dvc.lock") -> int:
    """Tag the stage runs of ``group`` with the dvc.lock hash of their stage; returns how many were tagged.

    Only a run whose recorded params/deps match the lock is meaningful to tag, so this is called right
    after DVC has written the lock (end of ``make repro``, after each ``dvc commit`` in the Prefect flow).
    The model versions those runs registered (``scoresde-<kind>``) get the same ``dvc_lock_md5`` tag.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    hashes = lock_hashes(lock_file)
    if not hashes:
        return 0
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    group = group or run_group()
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.run_group = '{group}'")
    client, tagged, by_run = MlflowClient(), 0, {}
    for _, row in runs.iterrows():
        name = row.get("tags.dvc_stage")
        if not (isinstance(name, str) and name in hashes):
            continue
        by_run[row["run_id"]] = hashes[name]
        if row.get("tags.dvc_lock_md5") != hashes[name]:
            client.set_tag(row["run_id"], "dvc_lock_md5", hashes[name])
            tagged += 1
    try:
        from pipeline.mlflow_model import tag_model_versions

        versions = tag_model_versions({r: h for r, h in by_run.items()}, client)
        if versions:
            print(f"[tracking] tagged {versions} registered model version(s) with their dvc.lock hash", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - a store without a model registry still gets its run tags
        print(f"[tracking] model versions not tagged: {err}", file=sys.stderr)
    return tagged


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tracking sync-lock|check|sync|reap``.

    ``sync-lock`` (``make repro`` runs it after ``dvc repro``): dvc.lock hashes onto the runs and model
    versions of a run group. ``check``: is the store reachable. ``sync [--to URI] [--from URI]``: copy the
    runs logged locally during a server outage to the server (:mod:`pipeline.tracking_sync`).
    ``reap [--max-age-s S] [--experiment NAME]``: mark KILLED the RUNNING runs with no heartbeat for S s.
    """
    import argparse

    from pipeline.params import ParamsError, read_params

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sync-lock", "check", "sync", "reap"])
    parser.add_argument("--group", default=None, help="sync-lock: the run group (default: this checkout's)")
    parser.add_argument("--to", default=None, help="sync: the server (default: the one each run was meant for)")
    parser.add_argument("--from", dest="source", default=None,
                        help=f"sync: the local store (default: {DEFAULT_URI} in the current folder)")
    parser.add_argument("--max-age-s", type=float, default=None, help="reap: heartbeat age bound (default 600)")
    parser.add_argument("--experiment", default=None, help="reap: only this experiment (default: all)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        from pipeline import tracking_sync

        try:
            results = tracking_sync.sync(args.source or tracking_sync.local_uri_of("."), args.to)
        except TrackingUnavailable as err:
            print(err, file=sys.stderr)
            return 1
        print(f"synced {len(results)} run(s), {sum(r.copied for r in results)} item(s) copied")
        return 0
    try:  # only the tracking settings are read: without a params file, MLFLOW_TRACKING_URI or the local store
        params = read_params(args.params) if Path(args.params).exists() or args.command == "sync-lock" else {}
    except ParamsError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        uri = configure(params.get("tracking"))
    except TrackingUnavailable as err:
        print(err, file=sys.stderr)
        return 1
    if args.command == "check":
        print(f"tracking store {uri} is reachable")
        return 0
    if args.command == "reap":
        from mlflow import MlflowClient

        from pipeline import tracking_sync

        client = MlflowClient(uri)
        exps = None
        if args.experiment:
            exp = client.get_experiment_by_name(args.experiment)
            if exp is None:
                print(f"experiment {args.experiment!r} not found at {uri}", file=sys.stderr)
                return 1
            exps = [exp.experiment_id]
        max_age = tracking_sync.DEFAULT_MAX_AGE_S if args.max_age_s is None else args.max_age_s
        reaped = tracking_sync.reap(client, max_age, exps)
        print(f"reaped {len(reaped)} run(s) with no heartbeat for {max_age:g} s ({uri})")
        return 0
    n = sync_lock_tags(params.get("experiment", "scoresde"), args.group)
    print(f"tagged {n} stage runs with their dvc.lock hash ({uri})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
