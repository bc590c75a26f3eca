"""The comparison report: MLflow runs -> reports/report.md and a self-contained reports/report.html.

Reads every run of one MLflow experiment back with ``mlflow.search_runs`` (a pandas DataFrame) and
groups the stage runs by their ``run_group`` tag (one group = one reproduction; parent runs carry
``scoresde.role=parent``, stage runs ``stage``, ``sde``, ``dvc_stage``, ``run_group``, ``git_commit``;
see :mod:`pipeline.tracking`).

The state of the pipeline *as of* a reproduction is, for each DVC stage, the run of that stage in
the group, or - when DVC found the stage up to date and did not re-run it - the latest earlier
finished run of that stage (marked ``*``). From that state the report builds:

- per-SDE FID / KID / NFE / seconds (evaluate@{sde}), with the sampler and checkpoint (EMA / raw);
- the classifier's accuracy and the real-vs-real FID floor (classifier, fid_ref);
- Figure 1 (toy): mode-weight error and sliced Wasserstein per sampler, exact vs learned scores,
  with the article's claims checked;
- Figures 2/3 (annealing), Figure 4 (ablation: FID against sigma_end), the samplers comparison;
- a comparison of the chosen reproduction with earlier ones of the same experiment;
- figures: the PNG artifacts of the runs (``figures/*.png``; the files under reports/figures/ when
  the runs have none) and plots drawn here with matplotlib, embedded as base64 data URIs.

Anything missing shows as "not run". The HTML has inline CSS, no scripts and no external resources.

    python -m pipeline.report --experiment NAME [--runs GROUP ...] [--out reports]
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

SDES = ("ncsn", "ve", "vp", "subvp")
SIGMA_ENDS = (0.1, 0.01, 0.001)
TOY_SAMPLERS = ("iid", "langevin", "annealed_langevin")
TOY_METRICS = ("mode_weight_error", "sliced_wasserstein")
NOT_RUN = "not run"
CARRIED = "*"
# Metrics compared across reproductions (kid_std_* is a spread, not a score).
HEADLINE = re.compile(r"(^|[_/.])(fid_|kid_(?!std))|mode_weight_error|sliced_wasserstein|^accuracy$")


class ReportError(RuntimeError):
    pass


# ------------------------------------------------------------------- data
@dataclass
class Run:
    run_id: str
    group: str
    stage: str
    dvc_stage: str
    sde: str
    status: str
    start: float                      # epoch seconds
    metrics: dict[str, float]
    tags: dict[str, str]
    params: dict[str, str]
    carried: bool = False             # taken from an earlier reproduction (stage not re-run)


@dataclass
class Group:
    name: str
    start: float
    git_commit: str
    n_finished: int = 0
    n_failed: int = 0
    versions: dict[str, str] = field(default_factory=dict)


def _clean(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
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
    """All runs of ``experiment`` (``mlflow.search_runs`` -> pandas) as stage runs and run groups."""
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
        if tags.get("scoresde.role") == "parent":
            g.versions = {k[len("version."):]: v for k, v in tags.items() if k.startswith("version.")}
            continue
        metrics = {c[8:]: float(v) for c, v in row.items() if c.startswith("metrics.") and _clean(v) is not None}
        params = {c[7:]: str(v) for c, v in row.items() if c.startswith("params.") and _clean(v) is not None}
        stage = tags.get("stage", "unknown")
        status = str(row.get("status", ""))
        if status == "FINISHED":
            g.n_finished += 1
        elif status in ("FAILED", "KILLED"):
            g.n_failed += 1
        if not g.versions:
            g.versions = {k[len("version."):]: v for k, v in tags.items() if k.startswith("version.")}
        runs.append(Run(str(row["run_id"]), group, stage, tags.get("dvc_stage", stage), tags.get("sde", "none"),
                        status, start, metrics, tags, params))
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
        if name not in state:
            state[name] = Run(**{**r.__dict__, "carried": True})
    return state


# ------------------------------------------------------------- structure
@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""


@dataclass
class Figure:
    caption: str
    png: bytes
    file: str | None = None           # relative path for the Markdown report (None: HTML only)


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def fmt(value: Any) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return NOT_RUN
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        if float(value).is_integer() and abs(value) < 1e5:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _mark(run: Run | None, text: str) -> str:
    return text + CARRIED if run is not None and run.carried and text != NOT_RUN else text


def _score_columns(metrics: Iterable[str]) -> list[str]:
    """Metric names ordered for display: fid, kid, kid_std, toy metrics, nfe, seconds, then the rest."""
    order = [r"^fid_", r"^kid_(?!std)", r"^kid_std_", r"sliced_wasserstein", r"mode_weight_error", r"^nfe$",
             r"^seconds$"]
    names = sorted(set(metrics))

    def key(n: str):
        for i, pat in enumerate(order):
            if re.search(pat, n):
                return (i, n)
        return (len(order), n)

    return sorted(names, key=key)


_METRIC_LIKE = r"(fid_.+|kid_.+|sliced_wasserstein.*|mode_weight_error.*|nfe|seconds|n|sigma|eval_seconds)"


def split_metric(name: str) -> tuple[str, str]:
    """Split a per-sampler metric name into (row, metric).

    ``pc/fid_x_n500``, ``fid_x_n500.pc`` and ``annealed_langevin_fid_x_n500`` (``<row>_<metric>``, as the
    samplers / annealing stages log them) -> (``pc`` | ``annealed_langevin``, ``fid_x_n500``); a bare metric
    name -> ("", name).
    """
    parts = re.split(r"[/.]", name, maxsplit=1)
    if len(parts) == 2:
        a, b = parts
        if re.fullmatch(_METRIC_LIKE, a) and not re.fullmatch(_METRIC_LIKE, b):
            return b, a
        return a, b
    if re.fullmatch(_METRIC_LIKE, name) and not re.match(r"^[a-z]+_(fid|kid)_", name):
        return "", name
    m = re.fullmatch(r"(?P<row>.+?)_(?P<metric>" + _METRIC_LIKE + ")", name)
    if m:
        return m.group("row"), m.group("metric")
    return "", name


# -------------------------------------------------------------- sections
_N_SUFFIX = re.compile(r"^(?P<base>.+)_n(?P<n>\d+)$")


def by_extractor(metrics: dict[str, float]) -> tuple[dict[str, float], int | None]:
    """``fid_digits_cnn_n500`` -> ``fid_digits_cnn`` (+ n = 500), so runs with different n share columns."""
    out, n = {}, None
    for name, value in metrics.items():
        m = _N_SUFFIX.match(name)
        if m and re.match(r"^(fid_|kid_|sliced_wasserstein|mode_weight_error)", name) and "_real_" not in name:
            out[m.group("base")] = value
            n = int(m.group("n"))
        elif name in ("nfe", "seconds"):
            out[name] = value
    return out, n


def section_sde(state: dict[str, Run]) -> tuple[Section, dict[str, float]]:
    sec = Section("Per-SDE sample quality (evaluate@{sde})")
    runs = {sde: state.get(f"evaluate@{sde}") for sde in SDES}
    for r in state.values():
        if r.stage == "evaluate" and r.sde not in runs:
            runs[r.sde] = r
    parsed = {sde: by_extractor(r.metrics) if r else ({}, None) for sde, r in runs.items()}
    cols = _score_columns(m for vals, _ in parsed.values() for m in vals)
    if not cols:
        cols = ["fid", "kid", "nfe", "seconds"]
    rows = []
    fids: dict[str, float] = {}
    for sde, r in runs.items():
        if r is None:
            rows.append([sde] + [NOT_RUN] * (len(cols) + 5))
            continue
        vals, n = parsed[sde]
        rows.append([sde, _mark(r, fmt(n))] + [_mark(r, fmt(vals.get(c))) for c in cols] +
                    [r.tags.get("sampler", "?"), r.tags.get("checkpoint", "?"), r.tags.get("extractor", "?"),
                     r.group + (" (earlier)" if r.carried else "")])
        fid = next((vals[c] for c in cols if c.startswith("fid_") and c in vals), None)
        if fid is not None:
            fids[sde] = fid
    sec.tables.append(Table(["sde", "samples n"] + cols + ["sampler", "checkpoint", "extractor", "run group"], rows))
    fallback = {r.tags.get("extractor_fallback") for r in runs.values() if r and r.tags.get("extractor_fallback")}
    for msg in sorted(fallback):
        sec.text.append(f"Feature extractor: {msg}.")
    sec.text.append("Columns are named after the feature extractor (fid_<extractor>); the MLflow metric names also "
                    "carry the sample count (fid_<extractor>_n<samples>). FID/KID of different extractors or "
                    "sample counts are not comparable; the real-vs-real floor is below.")
    return sec, fids


def section_reference(state: dict[str, Run]) -> Section:
    sec = Section("Feature extractor and reference (classifier, fid_ref)")
    clf, ref = state.get("classifier"), state.get("fid_ref")
    rows = []
    if clf is None:
        rows.append(["classifier test accuracy", NOT_RUN])
    elif "accuracy" in clf.metrics:
        rows.append([f"classifier test accuracy ({clf.tags.get('extractor', '?')})", _mark(clf, fmt(clf.metrics["accuracy"]))])
    else:
        rows.append(["classifier", _mark(clf, clf.tags.get("skipped", "no accuracy logged"))])
    if ref is None:
        rows.append(["reference statistics", NOT_RUN])
    else:
        rows.append(["reference images", _mark(ref, fmt(ref.metrics.get("n_reference")))])
        for name in _score_columns(m for m in ref.metrics if "_real_" in m):
            rows.append([f"real vs real: {name}", _mark(ref, fmt(ref.metrics[name]))])
        if ref.tags.get("extractor_message"):
            sec.text.append(f"Extractor choice: {ref.tags['extractor_message']}.")
    sec.tables.append(Table(["quantity", "value"], rows))
    sec.text.append("Real-vs-real FID (held-out real images against the reference) is the floor a perfect sampler "
                    "would reach with that many samples.")
    return sec


def parse_toy(metrics: dict[str, float]) -> dict[tuple[str, str, str], float]:
    """(scores, metric, sampler) -> value from names like ``exact.mode_weight_error.iid`` (any separators)."""
    out = {}
    for name, value in metrics.items():
        low = name.lower()
        score = next((s for s in ("exact", "learned") if s in low), None)
        metric = next((m for m in TOY_METRICS if m in low), None)
        if score is None or metric is None:
            continue
        rest = low.replace(score, "").replace(metric, "")
        sampler = re.sub(r"[._/\-]+", "_", rest).strip("_") or "?"
        out[(score, metric, sampler)] = value
    return out


def section_toy(state: dict[str, Run]) -> tuple[Section, list[list[Any]]]:
    sec = Section("Figure 1: toy mixture, Langevin with and without annealing (toy)")
    r = state.get("toy")
    vals = parse_toy(r.metrics) if r else {}
    samplers = list(TOY_SAMPLERS) + sorted({k[2] for k in vals} - set(TOY_SAMPLERS))
    cols = [f"{m} ({s})" for m in TOY_METRICS for s in ("exact", "learned")]
    rows = [[smp] + [_mark(r, fmt(vals.get((s, m, smp)))) for m in TOY_METRICS for s in ("exact", "learned")]
            for smp in samplers]
    sec.tables.append(Table(["sampler"] + cols, rows))
    if r is None:
        sec.text.append("The toy stage has not run in this experiment.")
    claims = []

    def claim(text, value, ok):
        claims.append([text, fmt(value), NOT_RUN if value is None else ("holds" if ok(value) else "FAILS")])

    claim("annealed Langevin, exact scores: mode weight error <= 0.02",
          vals.get(("exact", "mode_weight_error", "annealed_langevin")), lambda v: v <= 0.02)
    claim("annealed Langevin, learned scores: mode weight error <= 0.05",
          vals.get(("learned", "mode_weight_error", "annealed_langevin")), lambda v: v <= 0.05)
    claim("plain Langevin, exact scores: mode weight error > 0.15",
          vals.get(("exact", "mode_weight_error", "langevin")), lambda v: v > 0.15)
    claim("plain Langevin, learned scores: mode weight error > 0.15",
          vals.get(("learned", "mode_weight_error", "langevin")), lambda v: v > 0.15)
    return sec, claims


def _sigma_of(r: Run) -> float | None:
    for source in (r.tags.get("sigma_end"), *(v for k, v in r.params.items() if k.endswith("sigma_end") and "noise" not in k)):
        try:
            return float(source)
        except (TypeError, ValueError):
            continue
    m = re.search(r"@.*?([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", r.dvc_stage)
    return float(m.group(1)) if m else None


def section_ablation(state: dict[str, Run]) -> tuple[Section, list[list[Any]], dict[float, float]]:
    sec = Section("Figure 4: ablation of the smallest noise level sigma_end (ablation)")
    found: dict[float, Run] = {}
    for r in state.values():
        if r.stage == "ablation":
            s = _sigma_of(r)
            if s is not None:
                found[s] = r
    sigmas = sorted(set(SIGMA_ENDS) | set(found), reverse=True)
    parsed = {s: by_extractor(r.metrics) for s, r in found.items()}
    cols = _score_columns(m for vals, _ in parsed.values() for m in vals)
    if not cols:
        cols = ["fid"]
    rows, fid_by_sigma = [], {}
    for s in sigmas:
        r = found.get(s)
        if r is None:
            rows.append([fmt(s)] + [NOT_RUN] * (len(cols) + 1))
            continue
        vals, n = parsed[s]
        rows.append([fmt(s), _mark(r, fmt(n))] + [_mark(r, fmt(vals.get(c))) for c in cols])
        fid = next((vals[c] for c in cols if c.startswith("fid_") and c in vals), None)
        if fid is not None:
            fid_by_sigma[s] = fid
    sec.tables.append(Table(["sigma_end", "samples n"] + cols, rows))
    claims = []
    if fid_by_sigma.get(0.1) is not None and any(fid_by_sigma.get(s) is not None for s in (0.01, 0.001)):
        best_small = min(fid_by_sigma[s] for s in (0.01, 0.001) if s in fid_by_sigma)
        claims.append(["sigma_end 0.1 gives worse samples (higher FID) than 0.01 / 0.001",
                       f"{fmt(fid_by_sigma[0.1])} vs {fmt(best_small)}",
                       "holds" if fid_by_sigma[0.1] > best_small else "FAILS"])
    else:
        claims.append(["sigma_end 0.1 gives worse samples (higher FID) than 0.01 / 0.001", NOT_RUN, NOT_RUN])
    return sec, claims, fid_by_sigma


def section_rows_by_split(title: str, runs: list[Run], row_label: str, note: str) -> Section:
    """Runs whose metrics are laid out as ``<row>/<metric>`` (or one row per run, named by its tags)."""
    sec = Section(title)
    table: dict[str, dict[str, str]] = {}
    for r in runs:
        for name, value in r.metrics.items():
            row, metric = split_metric(name)
            row = row or r.tags.get("sampler") or (r.dvc_stage if len(runs) > 1 else "")
            table.setdefault(row or "(run)", {})[metric] = _mark(r, fmt(value))
    if not table:
        sec.text.append(f"{note} has not run in this experiment ({NOT_RUN}).")
        sec.tables.append(Table([row_label, "value"], [[NOT_RUN, NOT_RUN]]))
        return sec
    cols = _score_columns({m for row in table.values() for m in row})
    sec.tables.append(Table([row_label] + cols, [[k] + [row.get(c, "") for c in cols] for k, row in table.items()]))
    return sec


def _parse_float(text: str) -> float | None:
    try:
        return float(text.rstrip(CARRIED))
    except (ValueError, AttributeError):
        return None


def samplers_cost(sec: Section) -> dict[str, tuple[float, float]]:
    """sampler -> (nfe, fid) read back from the samplers table."""
    if not sec.tables or len(sec.tables[0].columns) < 2:
        return {}
    t = sec.tables[0]
    fid_col = next((i for i, c in enumerate(t.columns) if c.startswith("fid_")), None)
    nfe_col = next((i for i, c in enumerate(t.columns) if c == "nfe"), None)
    if fid_col is None or nfe_col is None:
        return {}
    out = {}
    for row in t.rows:
        fid, nfe = _parse_float(row[fid_col]), _parse_float(row[nfe_col])
        if fid is not None and nfe is not None and nfe > 0:
            out[str(row[0])] = (nfe, fid)
    return out


# ------------------------------------------------------------------ plots
def plot_cost(cost: dict[str, tuple[float, float]]) -> bytes:
    def draw(ax):
        for name, (nfe, fid) in cost.items():
            ax.scatter([nfe], [fid], s=30)
            ax.annotate(name, (nfe, fid), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (score evaluations per sample)")
        ax.set_ylabel("FID")
        ax.set_title("Sample quality against compute", fontsize=10)
        ax.grid(alpha=0.3)
    return _plot(draw)


def _plot(draw, size=(6.0, 3.6)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=110)
    try:
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def plot_bars(values: dict[str, float], ylabel: str, title: str) -> bytes:
    def draw(ax):
        names = list(values)
        ax.bar(names, [values[n] for n in names], color="#4c72b0")
        for i, n in enumerate(names):
            ax.text(i, values[n], fmt(values[n]), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    return _plot(draw)


def plot_ablation(fid_by_sigma: dict[float, float]) -> bytes:
    def draw(ax):
        s = sorted(fid_by_sigma)
        ax.plot(s, [fid_by_sigma[v] for v in s], "o-", color="#c44e52")
        ax.set_xscale("log")
        ax.set_xlabel("sigma_end (smallest noise level)")
        ax.set_ylabel("FID")
        ax.set_title("FID against sigma_end (Figure 4)", fontsize=10)
        ax.grid(alpha=0.3)
    return _plot(draw)


def plot_groups(series: dict[str, dict[str, float]], groups: list[str]) -> bytes:
    """series: label -> {group: value}; groups oldest -> newest on the x axis."""
    def draw(ax):
        x = list(range(len(groups)))
        for label, vals in series.items():
            ax.plot([i for i, g in enumerate(groups) if g in vals], [vals[g] for g in groups if g in vals], "o-", label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([g[-18:] for g in groups], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("FID")
        ax.set_title("FID per SDE across reproductions", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _plot(draw, size=(6.4, 3.8))


def plot_losses(histories: dict[str, list[tuple[int, float]]]) -> bytes:
    def draw(ax):
        for label, hist in histories.items():
            ax.plot([h[0] for h in hist], [h[1] for h in hist], label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss (train@{sde})", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _plot(draw)


# ----------------------------------------------------------------- figures
def run_figures(state: dict[str, Run], figures_dir: str | Path | None) -> list[Figure]:
    """PNG artifacts (``figures/``) of the stage runs; the files in ``figures_dir`` when the runs logged none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    figures: dict[str, Figure] = {}
    with tempfile.TemporaryDirectory(prefix="report_artifacts_") as tmp:
        for name in sorted(state):
            r = state[name]
            try:
                infos = client.list_artifacts(r.run_id, "figures")
            except Exception:  # noqa: BLE001 - a missing artifact store must not break the report
                continue
            for info in infos:
                if info.is_dir or not info.path.lower().endswith(".png"):
                    continue
                try:
                    local = client.download_artifacts(r.run_id, info.path, tmp)
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


def loss_histories(state: dict[str, Run]) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client, out = MlflowClient(), {}
    for sde in SDES:
        r = state.get(f"train@{sde}")
        if r is None or "loss" not in r.metrics:
            continue
        try:
            hist = client.get_metric_history(r.run_id, "loss")
        except Exception:  # noqa: BLE001
            continue
        if hist:
            out[sde] = sorted((m.step, m.value) for m in hist)
    return out


# ------------------------------------------------------------------ build
def build_sections(experiment: str, runs: list[Run], groups: dict[str, Group], primary: str, compare: list[str],
                   figures_dir: str | Path | None = "reports/figures") -> list[Section]:
    state = state_as_of(runs, groups, primary)
    sections: list[Section] = []

    g = groups.get(primary)
    overview = Section("Reproduction")
    ran = [r for r in state.values() if not r.carried]
    overview.tables.append(Table(["", ""], [
        ["experiment", experiment],
        ["run group", primary],
        ["git commit", g.git_commit if g else "unknown"],
        ["started", _dt.datetime.fromtimestamp(g.start, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if g and g.start else "unknown"],
        ["stage runs in this group", f"{len(ran)} finished, {g.n_failed if g else 0} failed"],
        ["stages carried from earlier runs (*)", ", ".join(sorted(r.dvc_stage for r in state.values() if r.carried)) or "none"],
        ["versions", ", ".join(f"{k} {v}" for k, v in sorted((g.versions if g else {}).items()) if v != "not-installed")],
    ]))
    overview.text.append(f"Values marked {CARRIED} come from the latest earlier run of that stage: DVC found it up to "
                         f"date and did not re-run it in this reproduction.")
    sections.append(overview)

    sde_sec, fids = section_sde(state)
    if fids:
        sde_sec.figures.append(Figure("FID per SDE", plot_bars(fids, "FID", "FID per SDE (evaluate)")))
    hist = loss_histories(state)
    if hist:
        sde_sec.figures.append(Figure("Training loss per SDE (MLflow metric history)", plot_losses(hist)))
    sections.append(sde_sec)
    sections.append(section_reference(state))

    toy_sec, toy_claims = section_toy(state)
    sections.append(toy_sec)
    annealing = [r for r in state.values() if r.stage == "annealing"]
    sections.append(section_rows_by_split("Figures 2/3: fixed-sigma Langevin vs annealed Langevin (annealing)",
                                          annealing, "sampler", "The annealing stage"))
    abl_sec, abl_claims, fid_by_sigma = section_ablation(state)
    if len(fid_by_sigma) >= 2:
        abl_sec.figures.append(Figure("FID against sigma_end", plot_ablation(fid_by_sigma)))
    sections.append(abl_sec)
    samplers = [r for r in state.values() if r.stage == "samplers"]
    smp_sec = section_rows_by_split("Samplers: quality against compute (samplers)", samplers, "sampler",
                                    "The samplers stage")
    cost = samplers_cost(smp_sec)
    if cost:
        smp_sec.figures.append(Figure("FID against NFE per sampler", plot_cost(cost)))
    sections.append(smp_sec)

    claims = Section("The article's claims, as measured")
    claims.tables.append(Table(["claim", "measured", "verdict"], toy_claims + abl_claims))
    sections.insert(1, claims)

    sections.append(section_comparison(runs, groups, [primary] + [c for c in compare if c != primary]))

    figs = Section("Figures")
    figs.figures = run_figures(state, figures_dir)
    if not figs.figures:
        figs.text.append(f"No figures ({NOT_RUN}).")
    sections.append(figs)
    return sections


def section_comparison(runs: list[Run], groups: dict[str, Group], chosen: list[str]) -> Section:
    sec = Section("Comparison with earlier reproductions")
    chosen = [c for c in chosen if c in groups]
    states = {c: state_as_of(runs, groups, c) for c in chosen}
    keys: dict[tuple[str, str], None] = {}
    for st in states.values():
        for name in sorted(st):
            for metric in sorted(st[name].metrics):
                if HEADLINE.search(metric):
                    keys[(name, metric)] = None
    cols = ["stage", "metric"] + [f"{c}" for c in chosen]
    if len(chosen) > 1:
        cols.append(f"change vs {chosen[1]}")
    rows = []
    for (name, metric) in sorted(keys):
        vals = []
        for c in chosen:
            r = states[c].get(name)
            vals.append(_mark(r, fmt(r.metrics.get(metric))) if r and metric in r.metrics else NOT_RUN)
        row = [name, metric] + vals
        if len(chosen) > 1:
            a, b = _parse_float(vals[0]), _parse_float(vals[1])
            row.append(fmt(a - b) if a is not None and b is not None else "")
        rows.append(row)
    if not rows:
        rows.append([NOT_RUN, ""] + [NOT_RUN] * (len(cols) - 2))
    info = [[c, groups[c].git_commit[:12], _dt.datetime.fromtimestamp(groups[c].start, _dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC") if groups[c].start else "?", str(groups[c].n_finished), str(groups[c].n_failed)]
        for c in chosen]
    sec.tables.append(Table(["run group", "git commit", "started", "finished runs", "failed runs"], info,
                            "Reproductions compared (the first is this report's)"))
    sec.tables.append(Table(cols, rows, "Headline metrics (FID / KID / toy errors / classifier accuracy)"))
    series: dict[str, dict[str, float]] = {}
    for c in chosen:
        for sde in SDES:
            r = states[c].get(f"evaluate@{sde}")
            if r:
                fid = next((v for k, v in sorted(r.metrics.items()) if k.startswith("fid_")), None)
                if fid is not None:
                    series.setdefault(sde, {})[c] = fid
    if len(chosen) > 1 and series:
        order = sorted(chosen, key=lambda c: groups[c].start)
        sec.figures.append(Figure("FID per SDE across reproductions", plot_groups(series, order)))
    if len(chosen) == 1:
        sec.text.append("No earlier reproduction in this experiment.")
    return sec


# ---------------------------------------------------------------- render
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;background:#fff}
h1{font-size:24px;border-bottom:2px solid #4c72b0;padding-bottom:6px}
h2{font-size:18px;margin-top:30px;color:#2b4c7e}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px}
th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f8}
tr:nth-child(even) td{background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.na{color:#999;font-style:italic}
td.ok{color:#17803d;font-weight:600} td.bad{color:#b42318;font-weight:600}
caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;border:1px solid #dde;padding:6px;background:#fcfcfe}
figure img{max-width:540px;min-width:180px;height:auto;display:block;image-rendering:pixelated}
figcaption{font-size:12px;color:#555;margin-top:4px}
p.note{font-size:13px;color:#444}
footer{margin-top:30px;font-size:12px;color:#777}
"""


def _cell_class(text: str) -> str:
    if text == NOT_RUN:
        return ' class="na"'
    if text == "holds":
        return ' class="ok"'
    if text == "FAILS":
        return ' class="bad"'
    if re.fullmatch(r"-?[0-9.]+(e[-+]?\d+)?\*?", text):
        return ' class="num"'
    return ""


def render_html(title: str, sections: list[Section], generated: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{html.escape(sec.title)}</h2>")
        for t in sec.tables:
            out.append("<table>")
            if t.caption:
                out.append(f"<caption>{html.escape(t.caption)}</caption>")
            if any(t.columns):
                out.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns) + "</tr>")
            for row in t.rows:
                cells = [fmt(v) if not isinstance(v, str) else v for v in row]
                out.append("<tr>" + "".join(f"<td{_cell_class(c)}>{html.escape(c)}</td>" for c in cells) + "</tr>")
            out.append("</table>")
        for p in sec.text:
            out.append(f'<p class="note">{html.escape(p)}</p>')
        if sec.figures:
            out.append('<div class="figs">')
            for f in sec.figures:
                data = base64.b64encode(f.png).decode("ascii")
                out.append(f'<figure><img alt="{html.escape(f.caption)}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
            out.append("</div>")
    out.append(f"<footer>Generated {html.escape(generated)} by pipeline.report from the MLflow tracking store; "
               f"self-contained (no scripts, no external resources).</footer></body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], generated: str) -> str:
    out = [f"# {title}", "", f"_Generated {generated} by `pipeline.report` from MLflow; plots are in report.html._", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for t in sec.tables:
            if t.caption:
                out += [f"**{t.caption}**", ""]
            cols = [str(c) or " " for c in t.columns]
            out.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
            out.append("|" + "|".join("---" for _ in cols) + "|")
            for row in t.rows:
                out.append("| " + " | ".join(_md_cell(fmt(v) if not isinstance(v, str) else v) for v in row) + " |")
            out.append("")
        for p in sec.text:
            out += [p, ""]
        for f in sec.figures:
            if f.file:
                out += [f"![{f.caption}]({f.file})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------- main
def generate(experiment: str, runs: list[str] | None = None, out: str | Path = "reports",
             figures_dir: str | Path | None = "reports/figures", max_groups: int = 5,
             primary: str | None = None) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html``; returns their paths.

    ``runs``: run groups to show (the first is the report's own; default: ``primary`` or the newest
    group, then up to ``max_groups`` earlier ones).
    """
    all_runs, groups = fetch_runs(experiment)
    newest_first = ordered_groups(groups)
    if runs:
        missing = [g for g in runs if g not in groups]
        if missing:
            raise ReportError(f"run groups not found in experiment {experiment!r}: {missing}; "
                              f"known: {newest_first[:10]}")
        chosen = list(dict.fromkeys(runs))
    else:
        first = primary if primary in groups else (newest_first[0] if newest_first else None)
        if first is None:
            chosen = []
        else:
            earlier = [g for g in newest_first if groups[g].start < groups[first].start or
                       (groups[g].start == groups[first].start and g != first)]
            chosen = [first] + earlier[:max_groups]
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Score-based diffusion reproduction: {experiment}"
    if chosen:
        sections = build_sections(experiment, all_runs, groups, chosen[0], chosen[1:], figures_dir)
    else:
        sections = [Section("Reproduction", [f"No runs in experiment {experiment!r} yet ({NOT_RUN})."])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    _atomic_write(md, render_markdown(title, sections, generated))
    _atomic_write(page, render_html(title, sections, generated))
    return md, page


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report",
                                     description="Regenerate the comparison report from the MLflow runs.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--runs", nargs="*", default=None, metavar="RUN_GROUP",
                        help="run groups to show, the report's own first (default: newest + earlier ones)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--figures", default="reports/figures",
                        help="PNG folder used when the runs logged no figure artifacts")
    parser.add_argument("--max-groups", type=int, default=5, help="earlier reproductions compared (default 5)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or params tracking.uri")
    args = parser.parse_args(argv)

    from pipeline.tracking import TrackingUnavailable, configure

    tracking = {"uri": args.tracking_uri} if args.tracking_uri else None
    if tracking is None:
        try:
            from pipeline.params import read_params

            tracking = read_params().get("tracking")
        except Exception:  # noqa: BLE001 - no params.yaml here: MLflow's defaults
            tracking = None
    try:
        if args.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
        uri = configure(tracking)
    except TrackingUnavailable as err:
        print(f"[report] {err}", file=sys.stderr)
        return 1
    try:
        md, page = generate(args.experiment, args.runs, args.out, args.figures, args.max_groups)
    except ReportError as err:
        print(f"[report] {err}", file=sys.stderr)
        return 1
    print(f"[report] {md} and {page} written from {uri} (experiment {args.experiment})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
