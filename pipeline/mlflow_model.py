"""Trained score models in MLflow: a pyfunc that samples, logged with a signature and registered.

``train@<kind>`` logs ``models/<kind>.pt`` (weights + EMA + config, as written by the stage) and the
noise schedule as the artifacts of a pyfunc model (:class:`ScoreSampler`) and registers it as
``scoresde-<kind>``; the model version carries tags ``git_commit``, ``dvc_stage``, ``run_id`` and, once
``python -m pipeline.tracking sync-lock`` ran after ``dvc repro``, ``dvc_lock_md5`` (:func:`tag_model_versions`).

Loading needs this project importable (``pip install -e .``); nothing is downloaded. ``predict`` takes a
DataFrame with columns ``n`` and ``seed`` (first row used) and returns ``n`` samples, float32, in data
space (images in [0, 1], ``(n, C, H, W)``); the sampler is the ``sample.<kind>`` section of the params
file at training time, overridable per call through ``params`` (``sampler``, ``steps``, ``n_steps_each``,
``step_lr``, ``num_steps``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

REGISTERED_PREFIX = "scoresde-"
PARAM_KEYS = {"sampler": "", "steps": 0, "n_steps_each": 0, "step_lr": 0.0, "num_steps": 0}
DEFAULT_SAMPLERS = {"ncsn": {"sampler": "annealed_langevin", "n_steps_each": 5, "step_lr": 4e-5},
                    "edm": {"sampler": "heun", "num_steps": 18}}


def registered_name(kind: str) -> str:
    return f"{REGISTERED_PREFIX}{kind}"


class ScoreSampler(mlflow.pyfunc.PythonModel):
    """pyfunc: ``{"n": [N], "seed": [S]}`` -> N samples of the trained score model (EMA weights, CPU)."""

    def load_context(self, context) -> None:
        from pipeline.generation import load_trained

        self.model, self.info = load_trained(context.artifacts["weights"], "cpu", use_ema=True)
        self.schedule = json.loads(Path(context.artifacts["schedule"]).read_text())
        self.config = dict(context.model_config or {})

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        import torch

        from pipeline.generation import generate

        row = model_input.iloc[0] if hasattr(model_input, "iloc") else model_input
        n, seed = int(row["n"]), int(row["seed"])
        cfg = {**self.config.get("sample", {}), "n": n, "batch_size": n}
        cfg.update({k: v for k, v in (params or {}).items() if v not in ("", 0, 0.0, None)})
        x, _, _ = generate(self.config["kind"], self.model, cfg, self.schedule, n, torch.device("cpu"), None,
                           self.info["centered"], seed=seed)
        return x.numpy().astype("float32")


def sample_config(kind: str, params_file: str | Path = "params.yaml") -> dict:
    """The sampler settings of ``sample.<kind>`` in the params file (plain values), else a default."""
    try:
        import yaml

        section = ((yaml.safe_load(Path(params_file).read_text()) or {}).get("sample") or {}).get(kind) or {}
    except (OSError, ValueError):
        section = {}
    cfg = {k: v for k, v in section.items() if k not in ("n", "batch_size", "use_ema", "device")
           and isinstance(v, (str, int, float, bool))}
    return cfg if cfg.get("sampler") else dict(DEFAULT_SAMPLERS.get(kind, {"sampler": "pc", "steps": 100}))


def signature(data_shape: list[int]):
    """Input ``n``, ``seed``; output float32 ``(n, *data_shape)``; params default to "as trained" (empty / 0)."""
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    return infer_signature(pd.DataFrame({"n": [2], "seed": [0]}), np.zeros((2, *data_shape), np.float32),
                           params=dict(PARAM_KEYS))


def requirements() -> list[str]:
    from importlib import metadata

    out = []
    for name in ("torch", "numpy", "pandas", "mlflow"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def log_model(run_id: str, weights: str | Path, kind: str, *, schedule: str | Path = "data/noise/schedule.json",
              version_tags: dict | None = None, step: int = 0) -> tuple[str, str | None]:
    """Log ``weights`` as a :class:`ScoreSampler` pyfunc of run ``run_id`` (the current tracking URI) and
    register it as ``scoresde-<kind>``; returns (model uri, registered version)."""
    import logging
    import warnings

    import mlflow
    from mlflow.models import Model

    from scoresde.checkpoint import load_model_state

    info = load_model_state(weights)["config"]
    cfg = sample_config(kind)
    quiet = logging.getLogger("mlflow.pyfunc")  # its cloudpickle notice: the class is this module's, by reference
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logged = Model.log(None, name="model", flavor=mlflow.pyfunc, run_id=run_id, python_model=ScoreSampler(),
                               artifacts={"weights": str(weights), "schedule": str(schedule)},
                               model_config={"kind": kind, "sample": cfg, "data_shape": info.get("data_shape")},
                               signature=signature(list(info["data_shape"])), pip_requirements=requirements(),
                               step=step, tags={"kind": kind}, await_registration_for=0)
    finally:
        quiet.setLevel(level)
    client = mlflow.MlflowClient()
    name = registered_name(kind)
    try:
        client.create_registered_model(name, description=f"scoresde {kind} score model (pyfunc sampler)")
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"run_id": run_id, "kind": kind, **(version_tags or {})}
    version = client.create_model_version(name, logged.model_uri, run_id=run_id, model_id=logged.model_id,
                                          tags={k: str(v) for k, v in tags.items()}, await_creation_for=0)
    return logged.model_uri, version.version


def tag_model_versions(run_hashes: dict[str, str], client=None) -> int:
    """Set ``dvc_lock_md5`` on the registered versions of each run id in ``run_hashes`` (run id -> hash)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    tagged = 0
    for run_id, md5 in run_hashes.items():
        for mv in client.search_model_versions(f"run_id = '{run_id}'"):
            if mv.name.startswith(REGISTERED_PREFIX) and mv.tags.get("dvc_lock_md5") != md5:
                client.set_model_version_tag(mv.name, mv.version, "dvc_lock_md5", md5)
                tagged += 1
    return tagged
