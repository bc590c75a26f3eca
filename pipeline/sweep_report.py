"""A sweep's results: ``reports/sweeps/<NAME>.json`` (every trial, the best, the baseline) and ``<NAME>.png``.

Both are rebuilt from the Optuna study after every finished trial and written atomically
(:mod:`scoresde.atomic`), so a killed driver leaves the last complete version. The JSON is what the
comparison report's "Tuning" section reads (:func:`pipeline.report_sections.section_tuning`).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from scoresde.atomic import atomic_path, atomic_write_text

ATTRS = ("seconds", "metrics", "ran", "restored", "unchanged", "mlflow_run_id", "error", "killed", "retry_of")


def trial_record(trial) -> dict:
    """One Optuna trial as a JSON-able dict: number, params, objective, status, seconds, and what ran."""
    ua = trial.user_attrs
    value = trial.value if trial.state.name == "COMPLETE" else None
    record = {"number": trial.number, "params": dict(trial.params), "objective": value,
              "status": trial.state.name, "seconds": ua.get("seconds")}
    record.update({k: ua[k] for k in ATTRS[1:] if k in ua})
    return record


def best_record(records: list[dict], direction: str) -> dict | None:
    done = [r for r in records if r["status"] == "COMPLETE" and isinstance(r.get("objective"), (int, float))]
    if not done:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    return min(done, key=lambda r: (sign * r["objective"], r["number"]))


def payload(spec, *, records: list[dict], defaults: dict, baseline: dict | None, rerun: list[str],
            storage: str, experiment: str | None, parent_run_id: str | None) -> dict:
    best = best_record(records, spec.objective.direction)
    return {
        "sweep": spec.name, "file": spec.source, "description": spec.description, "method": spec.method,
        "seed": spec.seed, "trials_requested": spec.budget, "max_parallel": spec.max_parallel,
        "objective": {"stage": spec.objective.stage, "metrics": spec.objective.metrics, "key": spec.objective.key,
                      "direction": spec.objective.direction},
        "params": {k: d.describe() for k, d in spec.params.items()},
        "log_params": [k for k, d in spec.params.items() if d.log],
        "defaults": defaults, "base_params": spec.base_params, "baseline": baseline,
        "targets": spec.targets, "rerun_per_trial": rerun,
        "study": storage, "mlflow": {"experiment": experiment, "parent_run_id": parent_run_id},
        "complete": sum(r["status"] == "COMPLETE" for r in records),
        "trials": records, "best": best,
        "updated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_json(path: Path, data: dict) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(path: Path, data: dict) -> Path:
    """Objective against each varied parameter (log x for log ranges), best trial and baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(data["params"])
    done = [r for r in data["trials"] if r["status"] == "COMPLETE" and r.get("objective") is not None]
    best, baseline = data.get("best"), (data.get("baseline") or {}).get("objective")
    label = data["objective"]["key"].rpartition(".")[2]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    try:
        for ax, key in zip(axes.flat, keys):
            spec = data["params"][key]
            kind = next(iter(spec))
            xs = [r["params"].get(key) for r in done]
            ys = [r["objective"] for r in done]
            default = data.get("defaults", {}).get(key)
            options = spec[kind] if kind in ("grid", "choice") else None
            categorical = options is not None and not _numeric(options)
            if categorical:
                pos = {json.dumps(v): i for i, v in enumerate(options)}
                xs = [pos.get(json.dumps(x), -1) for x in xs]
                ax.set_xticks(range(len(options)), [str(o) for o in options])
            ax.scatter(xs, ys, s=22, color="#4c72b0", alpha=0.8, label="trials")
            if best is not None and key in best["params"]:
                bx = best["params"][key]
                bx = pos.get(json.dumps(bx), -1) if categorical else bx
                ax.scatter([bx], [best["objective"]], s=90, marker="*", color="#c44e52", zorder=3,
                           label=f"best (trial {best['number']})")
            if baseline is not None:
                ax.axhline(baseline, color="0.4", ls="--", lw=1, label="defaults (base run)")
            if default is not None and not categorical and _numeric([default]):
                ax.axvline(default, color="0.6", ls=":", lw=1)
            numeric = [x for x in xs if isinstance(x, (int, float))]
            if kind == "log_uniform" or (options and not categorical and min(options) > 0
                                         and max(options) / min(options) >= 100):
                ax.set_xscale("log")
            elif numeric and not categorical and kind in ("grid", "choice"):
                ax.set_xticks(sorted(set(options)))
            ax.set_xlabel(key + (" (log)" if kind == "log_uniform" else ""))
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if handles:
            axes.flat[0].legend(handles, labels, fontsize=7, loc="best")
        fig.suptitle(f"sweep {data['sweep']} ({data['method']}, {data['complete']} trials): "
                     f"{data['objective']['stage']} {label}, {data['objective']['direction']}", fontsize=10)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
