"""The MLflow parent run of a Prefect flow run: opening it, and closing it when its flow is gone.

:func:`start_parent_run` configures MLflow like the stages do and opens the reproduction's parent run,
tagged with the Prefect flow run id, ``host`` and ``pid``. A parent run stays RUNNING until the flow
ends it; a flow whose process is SIGKILLed (lost worker, OOM killer, preemption) never does. Two
things close such runs (status KILLED, tag ``scoresde.end_reason``):

* :func:`close_stale_parent_runs`, called by every flow before it opens its own parent run: a
  RUNNING Prefect parent run is stale when its process is gone (same host, ``pid`` not alive) or its
  Prefect flow run is in a final state (e.g. CRASHED by Prefect's zombie-flow automation, from any
  host). Its RUNNING stage runs whose process is gone on this host are closed with it (the stage
  harness closes a stage's own orphans when that stage runs again: ``tracking.close_orphaned_runs``).
* :func:`close_parent_on_crash`, the flow's ``on_crashed`` / ``on_cancellation`` hook: runs where
  Prefect still can (the flow process got SIGTERM, or the worker saw its flow process die).

:func:`run_link` is where the parent run lives: the MLflow UI URL for an http(s) tracking server,
else the run's coordinates and the ``mlflow ui`` command that shows it.

On the Prefect side, a flow run whose process was SIGKILLed stays RUNNING until something notices:
flow runs of deployments send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, >= 30 s, in the
workers' environment), and :func:`create_zombie_automation` -- once per Prefect server:
``python -m pipeline.flow_tracking zombie-automation --within 90`` -- sets CRASHED a flow run whose
heartbeats stop (Prefect's "detect zombie flows" automation).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from pipeline.env import MLFLOW_TRACKING_URI, REPO

FINAL_PREFECT_STATES = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def absolute_sqlite(uri: str, root: str) -> str:
    """``sqlite:///mlflow.db`` relative to the repository root made absolute (the stages' cwd is the root)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((Path(root) / uri[len(prefix):]).resolve())
    return uri


def configure(root: str, params: dict) -> str:
    """Resolve, check and activate the tracking URI of ``params`` (the environment wins); returns it."""
    from pipeline import tracking

    settings = dict(params.get("tracking") or {})
    uri = absolute_sqlite(tracking.resolve_uri(settings), root)
    old = os.environ.get(MLFLOW_TRACKING_URI)
    os.environ[MLFLOW_TRACKING_URI] = uri  # configure() lets the environment win; restored below
    try:
        uri = absolute_sqlite(tracking.configure({**settings, "uri": uri}), root)
    finally:
        if old is None:
            os.environ.pop(MLFLOW_TRACKING_URI, None)
        else:
            os.environ[MLFLOW_TRACKING_URI] = old
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def start_parent_run(root: str, params: dict, group: str, tags: dict, logger: Any) -> tuple[str, str]:
    """Close stale parent runs, then open this flow run's; returns (run id, tracking URI)."""
    from pipeline import tracking

    uri = configure(root, params)
    experiment = str(params.get("experiment") or "scoresde")
    try:
        closed = close_stale_parent_runs(experiment)
        if closed:
            logger.warning("marked KILLED %d MLflow run(s) left RUNNING by a flow run that is gone: %s",
                           len(closed), ", ".join(closed))
    except Exception as err:  # noqa: BLE001 - housekeeping must not stop a reproduction
        logger.warning("could not check for stale MLflow parent runs: %s", err)
    run_id = tracking.start_parent_run(experiment, group, {"git_commit": tracking.git_commit(root),
                                                           "host": socket.gethostname(), "pid": os.getpid(), **tags})
    logger.info("MLflow parent run %s (experiment %r, group %r, %s)", run_id, experiment, group, uri)
    return run_id, uri


# ------------------------------------------------------------------ stale runs
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists (another user's) or cannot tell: leave it alone
    return True


def _process_gone(tags: dict, host: str) -> str | None:
    pid = str(tags.get("pid", ""))
    if tags.get("host") == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
        return f"process {pid} on {host} is gone"
    return None


def _prefect_state(flow_run_id: str) -> str | None:
    """The state type of a Prefect flow run (None when unknown: no API, no such run)."""
    import uuid

    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(flow_run_id)).state
        return state.type.value if state else None
    except Exception:  # noqa: BLE001 - cannot tell
        return None


def _close(client: Any, run_id: str, reason: str) -> None:
    client.set_tag(run_id, "scoresde.end_reason", reason)
    client.set_terminated(run_id, status="KILLED")


def _close_orphaned_children(client: Any, experiment_id: str, parent_id: str, host: str) -> list[str]:
    closed = []
    query = f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{parent_id}'"
    for child in client.search_runs([experiment_id], filter_string=query, max_results=1000):
        reason = _process_gone(child.data.tags, host)
        if reason:
            _close(client, child.info.run_id, f"{reason} (its flow run ended without closing it)")
            closed.append(child.info.run_id)
    return closed


def close_stale_parent_runs(experiment: str, *, check_prefect: bool = True) -> list[str]:
    """Mark KILLED the RUNNING Prefect parent runs of ``experiment`` whose flow run is gone (see module
    docstring), and their RUNNING stage runs whose process is gone; returns the run ids closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    host = socket.gethostname()
    query = "attributes.status = 'RUNNING' and tags.`scoresde.role` = 'parent' and tags.orchestrator = 'prefect'"
    closed: list[str] = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=1000):
        tags = run.data.tags
        reason = _process_gone(tags, host)
        flow_run_id = tags.get("prefect.flow_run_id", "")
        if reason is None and check_prefect and flow_run_id:
            state = _prefect_state(flow_run_id)
            if state in FINAL_PREFECT_STATES:
                reason = f"its Prefect flow run {flow_run_id} is {state}"
        if reason is None:
            continue
        _close(client, run.info.run_id, f"flow run left it RUNNING: {reason}")
        closed.append(run.info.run_id)
        closed += _close_orphaned_children(client, exp.experiment_id, run.info.run_id, host)
    return closed


# --------------------------------------------------------------------- hooks
def _tracking_of(parameters: dict) -> tuple[str, str] | None:
    """(tracking URI, experiment) of a flow run from its parameters, or None when it cannot be told."""
    import yaml

    from pipeline import tracking
    from pipeline.dvcgraph import find_root

    for candidate in (parameters.get("repo") or ".", os.environ.get(REPO) or ""):
        if not candidate:
            continue
        try:
            root = find_root(candidate)
        except Exception:  # noqa: BLE001
            continue
        path = Path(root) / str(parameters.get("params_file") or "params.yaml")
        params = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
        uri = absolute_sqlite(tracking.resolve_uri(params.get("tracking") or {}), root)
        return uri, str(params.get("experiment") or "scoresde")
    return None


def close_parent_on_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` / ``on_cancellation`` hook: close this flow run's RUNNING MLflow runs as KILLED."""
    try:
        found = _tracking_of(dict(flow_run.parameters or {}))
        if found is None or not flow_run.parameters.get("track", True):
            return
        uri, experiment = found
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        query = f"attributes.status = 'RUNNING' and tags.`prefect.flow_run_id` = '{flow_run.id}'"
        host = socket.gethostname()
        for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=10):
            _close(client, run.info.run_id, f"Prefect flow run {flow_run.id} ended {state.type.value}")
            _close_orphaned_children(client, exp.experiment_id, run.info.run_id, host)
            print(f"[flow] MLflow parent run {run.info.run_id} marked KILLED (flow run {state.type.value})")
    except Exception as err:  # noqa: BLE001 - a hook must not raise
        print(f"[flow] could not close the MLflow parent run of flow run {getattr(flow_run, 'id', '?')}: {err}")


# ---------------------------------------------------------------------- links
def run_link(run_id: str, tracking_uri: str, experiment_id: str | None = None) -> dict:
    """Where the parent run can be seen: ``{"url": ...}`` for an http(s) server (the MLflow UI's run
    page), else ``{"store": ..., "path": "#/experiments/E/runs/R", "command": "mlflow ui ..."}``."""
    if experiment_id is None:
        from mlflow.tracking import MlflowClient

        experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    path = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return {"url": f"{tracking_uri.rstrip('/')}/{path}", "experiment_id": experiment_id, "path": path}
    return {"store": tracking_uri, "experiment_id": experiment_id, "path": path,
            "command": f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000",
            "url_when_served": f"http://127.0.0.1:5000/{path}"}


# ------------------------------------------------------------- Prefect side
ZOMBIE_AUTOMATION = "scoresde-crash-zombie-flow-runs"


def create_zombie_automation(within_s: float = 90.0, name: str = ZOMBIE_AUTOMATION) -> Any:
    """Create the automation of Prefect's "detect zombie flows" guide on the current Prefect API: a flow
    run that sent a heartbeat and then neither another one nor a final state within ``within_s`` is
    set CRASHED. ``within_s`` should exceed the heartbeat frequency (default 90 s for 30 s heartbeats)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=name,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=within_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: the flow run's process is gone")],
    ).create()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.flow_tracking zombie-automation [--within S]`` (uses PREFECT_API_URL)."""
    import argparse

    from pipeline.env import flow_defaults

    flow_defaults()
    parser = argparse.ArgumentParser(prog="python -m pipeline.flow_tracking")
    parser.add_argument("command", choices=["zombie-automation"])
    parser.add_argument("--within", type=float, default=90.0, help="seconds without a heartbeat (default 90)")
    args = parser.parse_args(argv)
    automation = create_zombie_automation(args.within)
    print(f"automation {automation.name!r} ({automation.id}): flow runs silent for {args.within:g} s -> CRASHED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
