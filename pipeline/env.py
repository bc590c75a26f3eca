"""Every environment variable the pipeline reads or sets, by name, in one place.

Stages, the tracking module and the Prefect flow import these names instead of spelling the strings.
"""
from __future__ import annotations

import os

# ---- read by the project
TRACKING_OFF = "SCORESDE_TRACKING"        # "off": stages run without MLflow (outputs and DVC records only)
RUN_GROUP = "SCORESDE_RUN_GROUP"          # MLflow run group = one reproduction (make repro sets a fresh one)
PARENT_RUN_ID = "SCORESDE_PARENT_RUN_ID"  # MLflow parent run of the reproduction (set by the Prefect flow)
REPO = "SCORESDE_REPO"                    # checkout a Prefect worker runs in (prefect.yaml's pull step)
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"  # overrides params.yaml tracking.uri
# torchrun's process-group variables (read by scoresde.distributed and the stage harness)
RANK, LOCAL_RANK, WORLD_SIZE = "RANK", "LOCAL_RANK", "WORLD_SIZE"
# MLflow client HTTP bounds (pipeline.tracking.configure sets them from tracking.timeout_s unless set)
MLFLOW_HTTP_REQUEST_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"
MLFLOW_HTTP_REQUEST_MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"  # an integer; 1 (MLflow's 2 took 4.9 s/call)
MLFLOW_HTTP_REQUEST_BACKOFF_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # system metrics of train/sample runs
HEARTBEAT = "SCORESDE_HEARTBEAT_S"        # seconds between a stage run's heartbeat tags (reap reads them)

# ---- hyperparameter sweeps (pipeline.sweep)
SWEEP_STORAGE = "SCORESDE_SWEEP_STORAGE"  # Optuna storage URL of the sweeps (default: sweeps/<name>.db beside
                                          # the MLflow SQLite store, else in sweeps/)
SWEEP_TRIAL = "SCORESDE_SWEEP_TRIAL"      # set by the sweep driver for each trial's `dvc repro`: "<sweep>/<number>"

# ---- set by the Prefect flow for each stage command (like `dvc repro`), read by the stages
DVC_ROOT = "DVC_ROOT"                    # root of the DVC repository (kept if already set)
DVC_STAGE = "DVC_STAGE"                  # addressing of the stage being run ("train@ve"); tag dvc_stage
OMP_NUM_THREADS = "OMP_NUM_THREADS"      # cores / max_workers per stage, unless the user set it
PYTHONUNBUFFERED = "PYTHONUNBUFFERED"    # stage output streams line by line into the flow's log

# ---- offline defaults: telemetry of MLflow / Prefect / DVC off (no network here, and none wanted)
OFFLINE_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # the report downloads many small JSON artifacts
}

# ---- the Prefect flow's defaults, set before Prefect / DVC read their settings (only where unset)
FLOW_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # the ephemeral API of `python -m pipeline.flow`
}


def quiet_telemetry() -> None:
    """Set the offline defaults unless the user set them."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def flow_defaults() -> None:
    """The offline defaults plus :data:`FLOW_DEFAULTS`, unless the user set them (before importing Prefect)."""
    quiet_telemetry()
    for key, value in FLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)


def tracking_disabled() -> bool:
    """``SCORESDE_TRACKING=off`` runs stages without MLflow."""
    return os.environ.get(TRACKING_OFF, "").strip().lower() in {"off", "0", "false", "none"}


def is_rank_zero() -> bool:
    """Under torchrun only rank 0 tracks and writes outputs."""
    return int(os.environ.get(RANK, "0")) == 0
