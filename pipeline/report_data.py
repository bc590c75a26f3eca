"""The report's input: MLflow runs -> run groups -> the state of the pipeline as of one reproduction.

Every run of the experiment is read back with ``mlflow.search_runs``; stage runs are grouped by their
``run_group`` tag (one group = one reproduction; parent runs carry ``scoresde.role=parent`` and the
package versions). A run is matched to its stage by its tags (``dvc_stage`` such as ``evaluate@ve``,
``stage``, ``sde``), never by parsing names.

The state *as of* a reproduction is, for each DVC stage, its run in the group, or - when DVC found the
stage up to date and did not re-run it - the latest earlier finished run of that stage (``carried``,
shown with ``*``). The numbers of a run are the metrics JSON file its stage wrote and logged as an
artifact under ``metrics/`` (``metrics/evaluate_ve.json``); for the current checkout's reproduction
the local ``reports/metrics/<name>.json`` stands in for a run that logged none.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.report_render import Figure

METRICS_ARTIFACTS = "metrics"
SUPERSEDED_TAG = "scoresde.superseded_by"  # set by `python -m pipeline.tracking sync` (pipeline.tracking_sync)
FIGURE_ARTIFACTS = "figures"


class ReportError(RuntimeError):
    pass


# ------------------------------------------------------------------- runs
@dataclass
class Run:
    run_id: str
    group: str
    stage: str                        # tag `stage`: evaluate, ablation, toy, ...
    dvc_stage: str                    # tag `dvc_stage`: evaluate@ve, ablation@0.1, toy, ...
    sde: str                          # tag `sde` ("none" for stages without a model kind)
    status: str
    start: float                      # epoch seconds
    tags: dict[str, str]
    carried: bool = False             # taken from an earlier reproduction (stage not re-run)

    @property
    def metrics_name(self) -> str:
        """Stem of the stage's metrics file: ``evaluate@ve`` -> ``evaluate_ve``."""
        return self.dvc_stage.replace("@", "_")


@dataclass
class Group:
    name: str
    start: float
    git_commit: str
    n_finished: int = 0
    n_failed: int = 0
    versions: dict[str, str] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _epoch(value: Any) -> float:
    if value is None:
        return 0.0
    if hasattr(value, "timestamp"):
        try:
            return float(value.timestamp())
        except (ValueError, OverflowError):
            return 0.0
    try:
        return float(value) / (1000.0 if float(value) > 1e11 else 1.0)
    except (TypeError, ValueError):
        return 0.0


def fetch_runs(experiment: str) -> tuple[list[Run], dict[str, Group]]:
    """All stage runs of ``experiment`` and its run groups (``mlflow.search_runs`` -> pandas)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}")
    df = mlflow.search_runs([exp.experiment_id], output_format="pandas")
    runs: list[Run] = []
    groups: dict[str, Group] = {}
    for _, row in df.iterrows():
        tags = {c[5:]: str(v) for c, v in row.items() if c.startswith("tags.") and _clean(v) is not None}
        group = tags.get("run_group")
        if not group:
            continue
        start = _epoch(_clean(row.get("start_time")))
        g = groups.setdefault(group, Group(group, start, tags.get("git_commit", "unknown")))
        g.start = min(g.start, start) if g.start else start
        if g.git_commit == "unknown":
            g.git_commit = tags.get("git_commit", "unknown")
        versions = {k[len("version."):]: v for k, v in tags.items() if k.startswith("version.")}
        if tags.get("scoresde.role") == "parent":
            g.versions = versions or g.versions
            continue
        if tags.get(SUPERSEDED_TAG):  # a run the server lost mid-stage, replaced by its synced local copy
            continue
        status = str(row.get("status", ""))  # only FINISHED counts as done: RUNNING / KILLED / FAILED never do
        if status == "FINISHED":
            g.n_finished += 1
        elif status in ("FAILED", "KILLED"):
            g.n_failed += 1
        if not g.versions:
            g.versions = versions
        stage = tags.get("stage", "unknown")
        runs.append(Run(str(row["run_id"]), group, stage, tags.get("dvc_stage", stage), tags.get("sde", "none"),
                        status, start, tags))
    return runs, groups


def ordered_groups(groups: dict[str, Group]) -> list[str]:
    """Run groups, newest first."""
    return [g.name for g in sorted(groups.values(), key=lambda g: g.start, reverse=True)]


def state_as_of(runs: list[Run], groups: dict[str, Group], group: str) -> dict[str, Run]:
    """For each DVC stage: its latest finished run in ``group``, else the latest finished earlier one (carried)."""
    cutoff = groups[group].start if group in groups else float("inf")
    own: dict[str, Run] = {}
    earlier: dict[str, Run] = {}
    for r in runs:
        if r.status != "FINISHED" or r.stage == "report":
            continue
        if r.group == group:
            if r.dvc_stage not in own or r.start > own[r.dvc_stage].start:
                own[r.dvc_stage] = r
        elif groups.get(r.group) and groups[r.group].start < cutoff:
            if r.dvc_stage not in earlier or r.start > earlier[r.dvc_stage].start:
                earlier[r.dvc_stage] = r
    state = dict(own)
    for name, r in earlier.items():
        state.setdefault(name, replace(r, carried=True))
    return state


# --------------------------------------------------------------- metrics JSON
class MetricsFiles:
    """The metrics JSON of a run: its ``metrics/`` artifact (downloaded once), else a local fallback file."""

    def __init__(self) -> None:
        self._cache: dict[str, dict | None] = {}

    def _artifact(self, run: Run) -> dict | None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        try:
            infos = [i for i in client.list_artifacts(run.run_id, METRICS_ARTIFACTS)
                     if not i.is_dir and i.path.endswith(".json")]
        except Exception:  # noqa: BLE001 - a missing artifact store must not break the report
            return None
        by_name = {Path(i.path).name: i.path for i in infos}
        path = by_name.get(f"{run.metrics_name}.json") or (infos[0].path if len(infos) == 1 else None)
        if path is None:
            return None
        import mlflow

        with tempfile.TemporaryDirectory(prefix="report_metrics_") as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path=path, dst_path=tmp)
                data = json.loads(Path(local).read_text())
            except Exception:  # noqa: BLE001
                return None
        return data if isinstance(data, dict) else None

    def load(self, run: Run, fallback_dir: str | Path | None = None) -> dict | None:
        if run.run_id not in self._cache:
            self._cache[run.run_id] = self._artifact(run)
        data = self._cache[run.run_id]
        if data is None and fallback_dir is not None:
            path = Path(fallback_dir) / f"{run.metrics_name}.json"
            try:
                loaded = json.loads(path.read_text())
                data = loaded if isinstance(loaded, dict) else None
            except (OSError, ValueError):
                data = None
        return data


@dataclass
class Snapshot:
    """The state as of one reproduction, with each stage run's metrics JSON."""

    group: str
    runs: dict[str, Run]                                  # dvc_stage -> run
    data: dict[str, dict]                                 # dvc_stage -> metrics JSON (where found)
    local: set[str] = field(default_factory=set)          # dvc_stages whose JSON is the local fallback file

    @property
    def without_metrics(self) -> list[str]:
        return sorted(name for name in self.runs if name not in self.data)

    def find(self, stage: str, **tags: str) -> tuple[Run | None, dict | None]:
        """The run of ``stage`` whose tags match (latest if several) and its metrics JSON."""
        found = [r for r in self.runs.values() if r.stage == stage and all(r.tags.get(k) == v for k, v in tags.items())]
        if not found:
            return None, None
        r = max(found, key=lambda r: r.start)
        return r, self.data.get(r.dvc_stage)

    def all(self, stage: str) -> list[tuple[Run, dict | None]]:
        return [(r, self.data.get(r.dvc_stage)) for _, r in sorted(self.runs.items()) if r.stage == stage]

    def ablation(self) -> dict[float, tuple[Run, dict]]:
        """sigma_end (the JSON's ``sigma_end`` field) -> (run, ablation JSON)."""
        out: dict[float, tuple[Run, dict]] = {}
        for r, d in self.all("ablation"):
            if d is not None and isinstance(d.get("sigma_end"), (int, float)):
                out[float(d["sigma_end"])] = (r, d)
        return out

    def claims_input(self) -> dict[str, Any]:
        """The structured metrics :func:`pipeline.claims.evaluate` reads."""
        return {"toy": self.find("toy")[1], "annealing": self.find("annealing")[1], "fid_ref": self.find("fid_ref")[1],
                "ablation": {s: d for s, (_, d) in self.ablation().items()}}


def snapshot(runs: list[Run], groups: dict[str, Group], group: str, files: MetricsFiles,
             fallback_dir: str | Path | None = None) -> Snapshot:
    state = state_as_of(runs, groups, group)
    data, local = {}, set()
    for name, r in state.items():
        d = files.load(r)
        if d is None and fallback_dir is not None:
            d = files.load(r, fallback_dir)
            if d is not None:
                local.add(name)
        if d is not None:
            data[name] = d
    return Snapshot(group, state, data, local)


# -------------------------------------------------------------- params
def model_kinds(params: dict) -> list[str]:
    """The model kinds: the keys of params.yaml's ``train`` section other than ``device``."""
    return [k for k in (params.get("train") or {}) if k != "device"]


def sigma_ends(params: dict) -> list[float]:
    """params.yaml ``ablation.sigma_ends``."""
    return [float(s) for s in ((params.get("ablation") or {}).get("sigma_ends") or [])]


# -------------------------------------------------------- MLflow extras
def loss_histories(snap: Snapshot, kinds: list[str]) -> dict[str, list[tuple[int, float]]]:
    """kind -> the ``loss`` metric history of its train run."""
    from mlflow.tracking import MlflowClient

    client, out = MlflowClient(), {}
    for kind in kinds:
        r, _ = snap.find("train", sde=kind)
        if r is None:
            continue
        try:
            hist = client.get_metric_history(r.run_id, "loss")
        except Exception:  # noqa: BLE001
            continue
        if hist:
            out[kind] = sorted((m.step, m.value) for m in hist)
    return out


def run_figures(snap: Snapshot, figures_dir: str | Path | None) -> list[Figure]:
    """PNG artifacts (``figures/``) of the stage runs; the files in ``figures_dir`` the runs did not log."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="report_artifacts_") as tmp:
        for name in sorted(snap.runs):
            r = snap.runs[name]
            try:
                infos = client.list_artifacts(r.run_id, FIGURE_ARTIFACTS)
            except Exception:  # noqa: BLE001
                continue
            for info in infos:
                if info.is_dir or not info.path.lower().endswith(".png"):
                    continue
                try:
                    local = mlflow.artifacts.download_artifacts(run_id=r.run_id, artifact_path=info.path,
                                                                dst_path=str(Path(tmp) / r.run_id))
                    base = Path(info.path).name
                    figures[base] = Figure(f"{base} ({r.dvc_stage}{', earlier run' if r.carried else ''})",
                                           Path(local).read_bytes(), f"figures/{base}")
                except Exception:  # noqa: BLE001
                    continue
    if figures_dir and Path(figures_dir).is_dir():
        for path in sorted(Path(figures_dir).glob("*.png")):
            if path.name not in figures:
                figures[path.name] = Figure(f"{path.name} (workspace file)", path.read_bytes(), f"figures/{path.name}")
    return [figures[k] for k in sorted(figures)]
