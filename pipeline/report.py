"""The comparison report: MLflow runs -> reports/report.md and a self-contained reports/report.html.

The report reads every run of one MLflow experiment, groups the stage runs by their ``run_group`` tag
(one group = one reproduction) and takes, for each stage in the state of a reproduction, the metrics
JSON its stage logged as an artifact under ``metrics/`` (:mod:`pipeline.report_data`). From those
structured dicts it builds (:mod:`pipeline.report_sections`):

- per-model sample quality (evaluate@{kind}: extractor, n, FID / KID, NFE, seconds, sampler, checkpoint)
  and training (train@{kind}), with the loss history of the MLflow runs;
- the classifier's accuracy and the real-vs-real floor (classifier, fid_ref);
- the article's claims (:mod:`pipeline.claims`), Figure 1 (toy), Figures 2/3 (annealing), Figure 4
  (ablation) and the samplers' cost;
- the hyperparameter sweeps ("Tuning": best trial against the params.yaml defaults, from the
  ``reports/sweeps/<NAME>.json`` and ``.png`` that :mod:`pipeline.sweep` writes);
- a comparison of the chosen reproduction with earlier ones of the same experiment;
- figures: the PNG artifacts of the runs (``figures/*.png``; the files under reports/figures/ the runs
  did not log) and plots drawn with matplotlib, embedded as base64 data URIs (:mod:`pipeline.report_render`).

The model kinds (keys of params.yaml's ``train`` other than ``device``) and the σ_end values
(``ablation.sigma_ends``) come from the params file. Anything missing shows as "not run"; values of
stages carried over from an earlier reproduction carry ``*``.

    python -m pipeline.report --experiment NAME [--runs GROUP ...] [--out reports] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from pathlib import Path

from pipeline.env import MLFLOW_TRACKING_URI, quiet_telemetry

quiet_telemetry()

from pipeline.params import PARAMS_FILE, ParamsError, read_params  # noqa: E402
from pipeline.report_data import (Group, MetricsFiles, ReportError, Run, fetch_runs, loss_histories,  # noqa: E402
                                  model_kinds, ordered_groups, run_figures, sigma_ends, snapshot)
from pipeline.report_render import (CARRIED, NOT_RUN, Section, render_html, render_markdown)  # noqa: E402
from pipeline.report_sections import (section_ablation, section_annealing, section_claims,  # noqa: E402
                                      section_comparison, section_models, section_overview, section_reference,
                                      section_samplers, section_toy, section_tuning)
from scoresde.atomic import atomic_write_text  # noqa: E402

LOCAL_METRICS = "reports/metrics"   # the current checkout's metrics files (fallback for runs without the artifact)
SWEEPS = "reports/sweeps"           # results of pipeline.sweep (the "Tuning" section)

__all__ = ["CARRIED", "NOT_RUN", "ReportError", "build_sections", "generate", "main"]


def build_sections(experiment: str, runs: list[Run], groups: dict[str, Group], chosen: list[str], params: dict,
                   figures_dir: str | Path | None = "reports/figures",
                   local_metrics: str | Path | None = None, sweeps_dir: str | Path | None = SWEEPS,
                   report_dir: str | Path = "reports") -> list[Section]:
    """The report's sections for ``chosen[0]``, compared with ``chosen[1:]``.

    ``local_metrics``: folder of metrics files standing in for runs of ``chosen[0]``'s state that logged
    no metrics artifact (only meaningful when ``chosen[0]`` is the current checkout's reproduction).
    """
    kinds, sigmas = model_kinds(params), sigma_ends(params)
    files = MetricsFiles()
    snaps = [snapshot(runs, groups, chosen[0], files, local_metrics)]
    snaps += [snapshot(runs, groups, g, files) for g in chosen[1:]]
    snap = snaps[0]
    figures = Section("Figures")
    figures.figures = run_figures(snap, figures_dir)
    if not figures.figures:
        figures.text.append(f"No figures ({NOT_RUN}).")
    return [
        section_overview(experiment, snap, groups.get(chosen[0])),
        section_claims(snap),
        section_models(snap, kinds, loss_histories(snap, kinds)),
        section_reference(snap),
        section_toy(snap),
        section_annealing(snap),
        section_ablation(snap, sigmas),
        section_samplers(snap, [str(k) for k in (params.get("samplers") or {}).get("models") or []]),
        section_tuning(sweeps_dir, params, report_dir),
        section_comparison(snaps, groups, kinds),
        figures,
    ]


def choose_groups(groups: dict[str, Group], runs: list[str] | None, primary: str | None, max_groups: int) -> list[str]:
    """The run groups to show, the report's own first (see :func:`generate`)."""
    newest_first = ordered_groups(groups)
    if runs:
        missing = [g for g in runs if g not in groups]
        if missing:
            raise ReportError(f"run groups not found: {missing}; known: {newest_first[:10]}")
        return list(dict.fromkeys(runs))
    first = primary if primary in groups else (newest_first[0] if newest_first else None)
    if first is None:
        return []
    earlier = [g for g in newest_first if groups[g].start < groups[first].start or
               (groups[g].start == groups[first].start and g != first)]
    return [first] + earlier[:max_groups]


def generate(experiment: str, runs: list[str] | None = None, out: str | Path = "reports",
             figures_dir: str | Path | None = "reports/figures", max_groups: int = 5,
             primary: str | None = None, params: str | Path | dict = PARAMS_FILE,
             local_metrics: str | Path | None = LOCAL_METRICS,
             sweeps_dir: str | Path | None = SWEEPS) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html``; returns their paths.

    ``runs``: run groups to show (the first is the report's own; default: ``primary`` or the newest
    group, then up to ``max_groups`` earlier ones). ``params``: the params file (or its parsed dict)
    the model kinds and σ_end values are read from. ``local_metrics`` is used for the report's own
    group only when that group is the newest one (the current checkout). ``sweeps_dir``: the sweep
    results of the "Tuning" section.
    """
    params = params if isinstance(params, dict) else read_params(params)
    all_runs, groups = fetch_runs(experiment)
    try:
        chosen = choose_groups(groups, runs, primary, max_groups)
    except ReportError as err:
        raise ReportError(f"experiment {experiment!r}: {err}") from None
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Score-based diffusion reproduction: {experiment}"
    if chosen:
        current = chosen[0] == ordered_groups(groups)[0]
        sections = build_sections(experiment, all_runs, groups, chosen, params, figures_dir,
                                  local_metrics if current else None, sweeps_dir, out)
    else:
        sections = [Section("Reproduction", [f"No runs in experiment {experiment!r} yet ({NOT_RUN})."])]
    out = Path(out)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(title, sections, generated))
    atomic_write_text(page, render_html(title, sections, generated))
    return md, page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report",
                                     description="Regenerate the comparison report from the MLflow runs.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--runs", nargs="*", default=None, metavar="RUN_GROUP",
                        help="run groups to show, the report's own first (default: newest + earlier ones)")
    parser.add_argument("--out", default="reports", help="output folder (default: reports)")
    parser.add_argument("--params", default=PARAMS_FILE,
                        help="params file: model kinds (train.*), sigma_end values, tracking (default: params.yaml)")
    parser.add_argument("--figures", default="reports/figures",
                        help="PNG folder used for figures the runs did not log as artifacts")
    parser.add_argument("--max-groups", type=int, default=5, help="earlier reproductions compared (default 5)")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or params tracking.uri")
    args = parser.parse_args(argv)

    from pipeline.tracking import TrackingUnavailable, configure

    try:
        params = read_params(args.params)
    except ParamsError as err:
        print(f"[report] {err}", file=sys.stderr)
        return 2
    if args.tracking_uri:
        os.environ[MLFLOW_TRACKING_URI] = args.tracking_uri
    try:  # an unreachable store, an unknown experiment or run group: one line, exit 1
        uri = configure({"uri": args.tracking_uri} if args.tracking_uri else params.get("tracking"))
        md, page = generate(args.experiment, args.runs, args.out, args.figures, args.max_groups, params=params)
    except (TrackingUnavailable, ReportError) as err:
        print(f"[report] {err}", file=sys.stderr)
        return 1
    print(f"[report] {md} and {page} written from {uri} (experiment {args.experiment})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
