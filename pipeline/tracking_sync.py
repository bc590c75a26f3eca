"""Local runs to the server after an outage (``sync``), and runs whose process died (``reap``).

``python -m pipeline.tracking sync [--to URI] [--from URI]``: every finished run of the local store tagged
``scoresde.sync_to`` (a stage that logged locally because its server was down at start, or died during
the stage, with ``tracking.offline_fallback: true``) is copied to that server (or ``--to``): a run with the
same name, start and end time, status, params, metric histories (steps and timestamps kept), tags,
dataset inputs, artifacts (keyed images and tables included) and logged models with their registered
versions, nested under the reproduction's parent run there, tagged ``scoresde.synced_from`` = the local
run id. Only what the server lacks is copied, so a second sync copies nothing. The server's own run of
a stage that failed over mid-stage (left RUNNING when the server died) is marked KILLED and tagged
``scoresde.superseded_by`` = the synced run (the report skips superseded runs).

``python -m pipeline.tracking reap [--max-age-s S]``: a RUNNING run whose last sign of life - the
``scoresde.heartbeat`` tag its stage refreshes every ``SCORESDE_HEARTBEAT_S`` s, else its start time, and
for a parent run (the Prefect flow's, a sweep's) the newest heartbeat, start or end among its child runs -
is older than S seconds is marked KILLED (tag ``scoresde.end_reason``), whatever host it ran on.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking_run import HEARTBEAT_TAG, OFFLINE_OF_TAG, REMOTE_PARENT_TAG, SYNC_TO_TAG

SYNCED_FROM_TAG = "scoresde.synced_from"
SYNCED_TO_RUN_TAG = "scoresde.synced_to_run"
SUPERSEDED_TAG = "scoresde.superseded_by"
END_REASON_TAG = "scoresde.end_reason"
SYNCED_MODEL_TAG = "scoresde.synced_from_model"
SYNCED_VERSION_TAG = "scoresde.synced_from_version"
NOT_COPIED_TAGS = {"mlflow.parentRunId", SYNC_TO_TAG, OFFLINE_OF_TAG, REMOTE_PARENT_TAG, SYNCED_TO_RUN_TAG}
DEFAULT_MAX_AGE_S = 600.0


@dataclass
class SyncResult:
    local_run: str
    remote_run: str
    uri: str
    created: bool
    copied: int  # params + metric points + tags + inputs + artifact files + models + versions + status


def _all(search, *args, **kwargs) -> list:
    """Every page of an MLflow ``search_*`` call."""
    out, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def pending_runs(local) -> list:
    """Runs of the local store that are marked for a server (finished ones; RUNNING ones are still being written)."""
    exps = [e.experiment_id for e in local.search_experiments()]
    if not exps:
        return []
    runs = _all(local.search_runs, exps, filter_string=f"tags.`{SYNC_TO_TAG}` LIKE '%'")
    return sorted((r for r in runs if r.info.status != "RUNNING"), key=lambda r: r.info.start_time or 0)


def _artifact_files(client, run_id: str, path: str | None = None) -> dict[str, int]:
    files = {}
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            files.update(_artifact_files(client, run_id, info.path))
        else:
            files[info.path] = info.file_size or 0
    return files


def _remote_parent(remote, exp_id: str, run) -> str:
    wanted = run.data.tags.get(REMOTE_PARENT_TAG)
    if wanted:
        try:
            remote.get_run(wanted)
            return wanted
        except Exception:  # noqa: BLE001 - not on this server: by run group below
            pass
    group = run.data.tags.get("run_group", "unknown")
    found = remote.search_runs([exp_id], filter_string=f"tags.run_group = '{group}' and tags.`scoresde.role` = 'parent'",
                               max_results=1, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    parent = remote.create_run(exp_id, run_name=f"repro-{group}", start_time=run.info.start_time,
                               tags={"scoresde.role": "parent", "run_group": group,
                                     "git_commit": run.data.tags.get("git_commit", "unknown")})
    remote.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id


def _copy_metrics(local, remote, lid: str, rid: str, keys) -> int:
    from mlflow.entities import Metric

    def point(m):
        return (m.step, m.timestamp, "nan" if math.isnan(m.value) else repr(m.value))

    missing = []
    for key in keys:
        have = {point(m) for m in remote.get_metric_history(rid, key)}
        missing += [Metric(m.key, m.value, m.timestamp, m.step) for m in local.get_metric_history(lid, key)
                    if point(m) not in have]
    for i in range(0, len(missing), 1000):
        remote.log_batch(rid, metrics=missing[i:i + 1000], synchronous=True)
    return len(missing)


def _copy_artifacts(local, remote, lid: str, rid: str) -> int:
    have = _artifact_files(remote, rid)
    missing = [p for p in _artifact_files(local, lid) if p not in have]
    with tempfile.TemporaryDirectory(prefix="scoresde_sync_") as tmp:
        for path in missing:
            src = local.download_artifacts(lid, path, tmp)
            folder = os.path.dirname(path) or None
            remote.log_artifact(rid, src, folder)
    return len(missing)


def _copy_models(local, remote, local_uri: str, run, rid: str, exp_id: str) -> int:
    import mlflow
    from mlflow.entities import LoggedModelOutput

    lid, copied = run.info.run_id, 0
    mapping: dict[str, str] = {}
    outputs = run.outputs.model_outputs if run.outputs else []
    local_models = [local.get_logged_model(o.model_id) for o in outputs]
    remote_models = {m.tags.get(SYNCED_MODEL_TAG): m.model_id for m in
                     remote.search_logged_models([exp_id], filter_string=f"source_run_id = '{rid}'")}
    for lm in local_models:
        if lm.model_id in remote_models:
            mapping[lm.model_id] = remote_models[lm.model_id]
            continue
        tags = {k: v for k, v in (lm.tags or {}).items() if not k.startswith("mlflow.")}
        rm = remote.create_logged_model(exp_id, name=lm.name, source_run_id=rid, model_type=lm.model_type,
                                        params=dict(lm.params or {}), tags={**tags, SYNCED_MODEL_TAG: lm.model_id})
        with tempfile.TemporaryDirectory(prefix="scoresde_sync_model_") as tmp:
            local_dir = mlflow.artifacts.download_artifacts(artifact_uri=lm.artifact_location, dst_path=tmp,
                                                            tracking_uri=local_uri)
            remote.log_model_artifacts(rm.model_id, local_dir)
        remote.finalize_logged_model(rm.model_id, "READY")
        step = next((o.step for o in outputs if o.model_id == lm.model_id), 0)
        remote.log_outputs(rid, [LoggedModelOutput(rm.model_id, step)])
        mapping[lm.model_id] = rm.model_id
        copied += 1
    remote_versions = {mv.tags.get(SYNCED_VERSION_TAG) for mv in remote.search_model_versions(f"run_id = '{rid}'")}
    for mv in local.search_model_versions(f"run_id = '{lid}'"):
        key = f"{mv.name}/{mv.version}"
        source_id = getattr(mv, "model_id", None) or (mv.source[len("models:/"):] if mv.source.startswith("models:/") else "")
        model_id = mapping.get(source_id)
        if key in remote_versions or model_id is None:
            continue
        try:
            remote.create_registered_model(mv.name)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {**(mv.tags or {}), "run_id": rid, SYNCED_VERSION_TAG: key}
        remote.create_model_version(mv.name, f"models:/{model_id}", run_id=rid, model_id=model_id, tags=tags,
                                    await_creation_for=0)
        copied += 1
    return copied


def sync_run(local, remote, local_uri: str, uri: str, run) -> SyncResult:
    """Copy one local run to ``remote`` (only what it lacks)."""
    from mlflow.entities import Param, RunTag

    lid = run.info.run_id
    experiment = local.get_experiment(run.info.experiment_id).name
    exp_id = _experiment_id(remote, experiment)
    found = remote.search_runs([exp_id], filter_string=f"tags.`{SYNCED_FROM_TAG}` = '{lid}'", max_results=1)
    created = not found
    if found:
        rid = found[0].info.run_id
    else:
        parent = _remote_parent(remote, exp_id, run)
        rid = remote.create_run(exp_id, start_time=run.info.start_time, run_name=run.info.run_name,
                                tags={SYNCED_FROM_TAG: lid, "mlflow.parentRunId": parent}).info.run_id
    target = remote.get_run(rid)
    copied = 0
    params = [Param(k, v) for k, v in run.data.params.items() if k not in target.data.params]
    for i in range(0, len(params), 100):
        remote.log_batch(rid, params=params[i:i + 100], synchronous=True)
    tags = [RunTag(k, v) for k, v in run.data.tags.items()
            if k not in NOT_COPIED_TAGS and target.data.tags.get(k) != v]
    if tags:
        remote.log_batch(rid, tags=tags, synchronous=True)
    copied += len(params) + len(tags) + _copy_metrics(local, remote, lid, rid, run.data.metrics)
    have = {(d.dataset.name, d.dataset.digest) for d in (target.inputs.dataset_inputs if target.inputs else [])}
    inputs = [d for d in (run.inputs.dataset_inputs if run.inputs else []) if (d.dataset.name, d.dataset.digest) not in have]
    if inputs:
        remote.log_inputs(rid, datasets=inputs)
    copied += len(inputs) + _copy_artifacts(local, remote, lid, rid)
    copied += _copy_models(local, remote, local_uri, run, rid, exp_id)
    if target.info.status != run.info.status or target.info.end_time != run.info.end_time:
        remote.set_terminated(rid, run.info.status, end_time=run.info.end_time)
        copied += 1
    original = run.data.tags.get(OFFLINE_OF_TAG)
    if original:
        copied += _supersede(remote, original, rid, uri)
    if run.data.tags.get(SYNCED_TO_RUN_TAG) != rid:
        local.set_tag(lid, SYNCED_TO_RUN_TAG, rid)
    return SyncResult(lid, rid, uri, created, copied)


def _supersede(remote, original: str, rid: str, uri: str) -> int:
    try:
        run = remote.get_run(original)
    except Exception:  # noqa: BLE001 - the server lost it too
        return 0
    if run.data.tags.get(SUPERSEDED_TAG) == rid:
        return 0
    remote.set_tag(original, SUPERSEDED_TAG, rid)
    if run.info.status == "RUNNING":
        remote.set_tag(original, END_REASON_TAG, f"tracking server {uri} lost during the stage; the stage "
                       f"finished in the local store, synced as run {rid}")
        remote.set_terminated(original, "KILLED")
    return 1


def sync(local_uri: str, to: str | None = None, log=print) -> list[SyncResult]:
    """Copy every pending run of ``local_uri`` to its server (or ``to``); returns one result per run."""
    from mlflow import MlflowClient

    from pipeline.tracking import ensure_reachable

    local = MlflowClient(local_uri)
    results, remotes = [], {}
    for run in pending_runs(local):
        uri = to or run.data.tags[SYNC_TO_TAG]
        if uri not in remotes:
            ensure_reachable(uri)
            remotes[uri] = MlflowClient(uri)
        result = sync_run(local, remotes[uri], local_uri, uri, run)
        results.append(result)
        log(f"[sync] {run.data.tags.get('dvc_stage', run.info.run_name)}: local run {result.local_run} -> "
            f"{uri} run {result.remote_run} ({'created, ' if result.created else ''}{result.copied} item(s) copied)")
    return results


# --------------------------------------------------------------------- reap
def _seconds(ms) -> float:
    return (ms or 0) / 1000.0


def last_sign_of_life(run) -> float:
    """Epoch seconds: the run's heartbeat tag, else its start time."""
    beat = run.data.tags.get(HEARTBEAT_TAG, "")
    try:
        return max(float(beat), _seconds(run.info.start_time))
    except ValueError:
        return _seconds(run.info.start_time)


def reap(client, max_age_s: float = DEFAULT_MAX_AGE_S, experiment_ids: list[str] | None = None,
         now: float | None = None, log=print) -> list[str]:
    """Mark KILLED every RUNNING run with no sign of life for ``max_age_s`` seconds; returns their ids."""
    now = time.time() if now is None else now
    exps = experiment_ids or [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return []
    reaped = []
    for run in _all(client.search_runs, exps, filter_string="attributes.status = 'RUNNING'"):
        seen = last_sign_of_life(run)
        if now - seen <= max_age_s:
            continue
        for child in _all(client.search_runs, exps, filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"):
            seen = max(seen, last_sign_of_life(child), _seconds(child.info.end_time))
        if now - seen <= max_age_s:
            continue
        reason = (f"no heartbeat for {now - seen:.0f} s (bound {max_age_s:g} s); reaped from "
                  f"{socket.gethostname()} (process {run.data.tags.get('pid', '?')} on {run.data.tags.get('host', '?')})")
        client.set_tag(run.info.run_id, END_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(seen * 1000))
        reaped.append(run.info.run_id)
        log(f"[reap] run {run.info.run_id} ({run.data.tags.get('dvc_stage', run.info.run_name)}): {reason}: KILLED")
    return reaped


def local_uri_of(root: str | Path = ".") -> str:
    """The local store the fallback writes to, made absolute against ``root``."""
    from pipeline.tracking import DEFAULT_URI

    return "sqlite:///" + str((Path(root) / DEFAULT_URI[len("sqlite:///"):]).resolve())
