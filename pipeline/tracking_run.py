"""The MLflow run of one stage (:class:`StageRun`): logging calls that survive the tracking server dying.

Every call goes through an explicit ``MlflowClient`` and run id (never MLflow's global "active run"), and
is kept in a journal. When a call fails and the server no longer answers ``/health``:

* with ``tracking.offline_fallback: true`` the run continues in the local store (``sqlite:///mlflow.db``):
  a local run is created with the same tags and start time, the journal is replayed into it (so it holds
  the whole stage: params, metrics with their steps and timestamps, tags, artifacts, images, tables,
  dataset inputs) and the failed call is retried there. The local run is tagged ``scoresde.sync_to``
  (the server) and ``scoresde.offline_of`` (the server's run), which is how
  ``python -m pipeline.tracking sync`` finds the runs to copy once the server is back;
* without it the call raises :class:`~pipeline.tracking.TrackingUnavailable` naming the URI, after the
  client's bounded retries (``tracking.timeout_s`` and MLFLOW_HTTP_REQUEST_* set by ``configure``); the
  run is then left alone (no more calls to the dead server) and the stage fails before its later outputs.

A daemon thread sets the tag ``scoresde.heartbeat`` (epoch seconds) every ``SCORESDE_HEARTBEAT_S``
seconds (default 30) while the stage is alive, so ``python -m pipeline.tracking reap`` can close, from
any host, the runs of processes that died without closing them. Train and sample runs record system
metrics (MLflow's ``system/*``, sampled every second). Failures of the optional logging (images, tables,
dataset inputs, models) are printed and do not stop a stage; a lost server is handled as above.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import env
from pipeline.params import flatten

HEARTBEAT_TAG = "scoresde.heartbeat"
HEARTBEAT_ENV = env.HEARTBEAT        # seconds between heartbeats (default 30)
HEARTBEAT_S = 30.0
SYNC_TO_TAG = "scoresde.sync_to"              # local run to copy to this tracking URI
OFFLINE_OF_TAG = "scoresde.offline_of"        # the server's run this local run continues
REMOTE_PARENT_TAG = "scoresde.remote_parent"  # the server's parent run of the reproduction
SYSTEM_METRICS_STAGES = ("train", "sample")
SYSTEM_METRICS_INTERVAL_S = 1.0               # a stage of a few seconds still gets samples

Op = Callable[[Any, str], Any]  # (client, run id) -> result


def heartbeat_s() -> float:
    try:
        return max(0.2, float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S)))
    except ValueError:
        return HEARTBEAT_S


def system_metrics_wanted(stage: str) -> bool:
    """Train and sample runs log MLflow system metrics; quiet, sampled every second unless the user set it."""
    if stage.split("@")[0] not in SYSTEM_METRICS_STAGES:
        return False
    import logging

    import mlflow

    os.environ.setdefault(env.MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, str(SYSTEM_METRICS_INTERVAL_S))
    mlflow.set_system_metrics_samples_before_logging(1)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    return True


def _short(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Max retries exceeded" in text or "Failed to establish" in text:
        return "no answer: connection refused or timed out, after the client's retries"
    return text[:300]


def _warn(message: str) -> None:
    print(f"[tracking] {message}", file=sys.stderr, flush=True)


class StageRun:
    """Handle on the MLflow run of a stage (keeps MLflow calls out of the stage bodies)."""

    def __init__(self, run_id: str, stage: str, sde: str | None = None, *, uri: str | None = None,
                 experiment: str | None = None, parent_run_id: str | None = None, tags: dict | None = None,
                 fallback: bool = False, timeout_s: float = 10.0, start_time: int | None = None,
                 run_name: str | None = None, fluent: bool = False, system_metrics: bool = False):
        self.run_id, self.stage, self.sde = run_id, stage, sde
        self.uri = uri
        self.experiment, self.parent_run_id, self.run_name = experiment, parent_run_id, run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.fallback, self.timeout_s, self.start_time = fallback, float(timeout_s), start_time
        self.max_step: int | None = None
        self.offline_of: str | None = None  # the server's run id, once the stage continued locally
        self.lost = False                   # the server died and there is no fallback: no more calls
        self._fluent = run_id if fluent else None
        self._system_metrics = system_metrics
        self._monitor = None
        self._journal: list[Op] = []
        self._lock = threading.RLock()
        self._client = None
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------ plumbing
    @property
    def client(self):
        if self._client is None:
            import mlflow
            from mlflow import MlflowClient

            self.uri = self.uri or mlflow.get_tracking_uri()
            self._client = MlflowClient(self.uri)
        return self._client

    def _call(self, op: Op, *, replay: bool = True, optional: str | None = None) -> Any:
        """Run ``op(client, run_id)``; on a lost server fail over (or raise); ``optional`` names what is
        skipped, with a message, when the call fails for another reason."""
        with self._lock:
            if self.lost:
                return None
            try:
                result = op(self.client, self.run_id)
            except Exception as err:  # noqa: BLE001 - classified below
                if not self._server_lost():
                    if optional is None:
                        raise
                    _warn(f"{self.stage}: {optional} not logged: {_short(err)}")
                    return None
                self._on_lost(err)
                result = op(self.client, self.run_id)
            if replay:
                self._journal.append(op)
            return result

    def _server_lost(self) -> bool:
        from pipeline.tracking import TrackingUnavailable, ensure_reachable

        if self.offline_of is not None or not str(self.uri or "").startswith(("http://", "https://")):
            return False
        try:
            ensure_reachable(self.uri, min(self.timeout_s, 5.0))
        except TrackingUnavailable:
            return True
        return False

    def _on_lost(self, err: BaseException) -> None:
        from pipeline.tracking import DEFAULT_URI, TrackingUnavailable

        message = f"MLflow tracking server {self.uri} was lost during stage {self.stage} ({_short(err)})"
        if not self.fallback:
            self.lost = True
            self._drop_fluent()
            raise TrackingUnavailable(f"{message}; set tracking.offline_fallback: true to continue on the "
                                      f"local store") from None
        _warn(f"{message}\n[tracking] offline_fallback: run {self.run_id} continues in the local store "
              f"{DEFAULT_URI}; `python -m pipeline.tracking sync` copies it to the server later")
        self._failover(DEFAULT_URI)

    def _drop_fluent(self) -> None:
        """Forget MLflow's fluent state of the server's run without calling the server."""
        if self._fluent is None:
            return
        from mlflow.tracking import fluent

        monitor = fluent.run_id_to_system_metrics_monitor.pop(self._fluent, None)
        if monitor is not None:
            monitor._shutdown_event.set()  # its thread exits on its own; no flush to a dead server
        stack = fluent._active_run_stack.get()
        if stack and stack[-1].info.run_id == self._fluent:
            stack.pop()
            os.environ.pop("MLFLOW_RUN_ID", None)
        self._fluent = None

    def _failover(self, local_uri: str) -> None:
        import mlflow
        from mlflow import MlflowClient

        from pipeline.tracking import find_or_create_parent

        remote_uri, remote_id = self.uri, self.run_id
        self._drop_fluent()
        mlflow.set_tracking_uri(local_uri)
        local = MlflowClient(local_uri)
        experiment = self.experiment or "scoresde"
        exp = local.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else local.create_experiment(experiment)
        group = self.tags.get("run_group")
        local_parent = find_or_create_parent(experiment, group) if group else None
        tags = {**self.tags, SYNC_TO_TAG: remote_uri, OFFLINE_OF_TAG: remote_id,
                REMOTE_PARENT_TAG: self.parent_run_id or "", HEARTBEAT_TAG: f"{time.time():.3f}"}
        if local_parent:
            tags["mlflow.parentRunId"] = local_parent
        run = local.create_run(exp_id, start_time=self.start_time, tags=tags, run_name=self.run_name or self.stage)
        self.uri, self.run_id, self._client, self.offline_of = local_uri, run.info.run_id, local, remote_id
        self.parent_run_id = local_parent
        for op in self._journal:
            op(local, self.run_id)
        if self._system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=local_uri)
            self._monitor.start()

    # ------------------------------------------------------------ life cycle
    def start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="scoresde-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        period = heartbeat_s()
        while not self._beat_stop.wait(period):
            with self._lock:
                if self.lost:
                    return
                try:
                    self.client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
                except Exception:  # noqa: BLE001 - the main thread handles a lost server
                    pass

    def close(self, status: str = "FINISHED") -> None:
        """End the run with ``status``. A lost server: fail over (with the fallback) or raise; when the stage
        is already failing (status not FINISHED) a close that fails is only reported, not to mask its error."""
        self._beat_stop.set()
        with self._lock:
            if self.lost:
                return
            try:
                self._close(status)
            except Exception as err:
                if status == "FINISHED":
                    raise
                _warn(f"{self.stage}: could not mark run {self.run_id} {status} ({self.uri}): {_short(err)}")

    def _close(self, status: str) -> None:
        import mlflow

        if self._fluent is not None:
            try:
                mlflow.end_run(status)  # also stops the system metrics monitor
                self._fluent = None
                return
            except Exception as err:  # noqa: BLE001
                self._drop_fluent()
                if not self._server_lost():
                    raise
                self._on_lost(err)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self.client.set_terminated(self.run_id, status)

    # ------------------------------------------------------------ logging
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        if step is not None:
            self.max_step = max(int(step), self.max_step or 0)
        for i in range(0, len(clean), 1000):
            batch = clean[i:i + 1000]
            self._call(lambda c, r, batch=batch: c.log_batch(r, metrics=batch, synchronous=True))

    def log_params(self, params: dict) -> None:
        import json

        from mlflow.entities import Param

        flat = {k: json.dumps(v) if isinstance(v, (list, tuple)) else v for k, v in flatten(params).items()}
        items = [Param(k, str(v)) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            batch = items[i:i + 100]
            self._call(lambda c, r, batch=batch: c.log_batch(r, params=batch, synchronous=True))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._call(lambda c, r: c.log_artifact(r, str(path), artifact_path))

    def log_dict(self, data: dict, name: str) -> None:
        self._call(lambda c, r: c.log_dict(r, data, name))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.tags.update({t.key: t.value for t in batch})
        self._call(lambda c, r: c.log_batch(r, tags=batch, synchronous=True))

    def log_image(self, path: str | Path, key: str | None = None, step: int | None = None) -> None:
        """A PNG as a keyed image (the UI compares images of one key across runs and steps)."""
        from PIL import Image

        path = Path(path)
        if not path.exists():
            return
        key = key or path.stem
        step = int(step if step is not None else (self.max_step or 0))

        def op(c, r):
            with Image.open(path) as image:
                c.log_image(r, image.convert("RGB") if image.mode not in ("RGB", "RGBA", "L") else image.copy(),
                            key=key, step=step, synchronous=True)

        self._call(op, optional=f"image {path}")

    def log_table(self, path: str | Path, artifact_file: str | None = None) -> None:
        """A CSV / Parquet output as an MLflow table (``tables/<stem>.json``)."""
        from pipeline.tracking_outputs import read_table

        df = read_table(path)
        if df is None:
            return
        name = artifact_file or f"tables/{Path(path).stem}.json"
        self._call(lambda c, r: c.log_table(r, df, name), optional=f"table {path}")

    def log_dataset(self, path: str | Path, name: str | None = None, context: str = "training") -> None:
        """The prepared dataset as a run input (name, digest = the file's md5, source = its path)."""
        from pipeline.tracking_outputs import dataset_input

        try:
            entity = dataset_input(path, name, context)
        except Exception as err:  # noqa: BLE001
            _warn(f"{self.stage}: dataset {path} not logged: {_short(err)}")
            return
        if entity is not None:
            self._call(lambda c, r: c.log_inputs(r, datasets=[entity]), optional=f"dataset {path}")

    def log_model(self, weights: str | Path, kind: str) -> str | None:
        """Log the trained model as a pyfunc sampler and register it as ``scoresde-<kind>``; returns its version."""
        from pipeline.mlflow_model import log_model

        tags = {k: self.tags[k] for k in ("git_commit", "dvc_stage", "run_group") if k in self.tags}

        def op(c, r):
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            return log_model(r, weights, kind, version_tags=tags, step=self.max_step or 0)[1]

        return self._call(op, replay=False, optional=f"model {weights}")

    def log_to_parent(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file to the reproduction's parent run (the report)."""
        parent = self.parent_run_id
        if parent and Path(path).exists():
            self._call(lambda c, r: c.log_artifact(parent, str(path), artifact_path), replay=False,
                       optional=f"{path} on the parent run")

    def log_outputs(self, dvc_stage: str, dvc_yaml: str | Path = "dvc.yaml") -> None:
        """Every PNG the stage declares in dvc.yaml as a keyed image; every CSV / Parquet as a table."""
        from pipeline.tracking_outputs import declared_outputs

        try:
            outs = declared_outputs(dvc_stage, dvc_yaml)
        except Exception as err:  # noqa: BLE001
            _warn(f"{self.stage}: outputs of {dvc_stage} not read from {dvc_yaml}: {_short(err)}")
            return
        for out in outs:
            suffix = Path(out).suffix.lower()
            if suffix == ".png":
                self.log_image(out)
            elif suffix in (".csv", ".parquet"):
                self.log_table(out)


class NullRun(StageRun):
    """Stands in for a run where nothing is tracked (non-zero ranks under torchrun, tracking off)."""

    def __init__(self):
        super().__init__("", "", None)

    def _call(self, op, *, replay=True, optional=None): return None
    def start_heartbeat(self): pass
    def close(self, status="FINISHED"): pass
    def log_metrics(self, metrics, step=None): pass
    def log_params(self, params): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_dict(self, data, name): pass
    def set_tags(self, tags): pass
    def log_image(self, path, key=None, step=None): pass
    def log_table(self, path, artifact_file=None): pass
    def log_dataset(self, path, name=None, context="training"): pass
    def log_model(self, weights, kind): return None
    def log_to_parent(self, path, artifact_path=None): pass
    def log_outputs(self, dvc_stage, dvc_yaml="dvc.yaml"): pass
