"""Prefect artifacts of a flow run of the DVC pipeline (:mod:`pipeline.flow`), published at its end.

Success or failure, every flow run leaves three artifacts on its Prefect flow run page:

* ``scoresde-stages`` (table): one row per stage -- ``stage``, ``action`` (ran / skipped / restored /
  pulled / frozen / failed / not run ...), ``attempts`` (task attempts started; 0 = never started)
  and ``seconds`` (first attempt's start to the last one's end, retry waits included).
* ``scoresde-report`` (markdown): the pipeline's Markdown report (``prefect.report_markdown``,
  default ``reports/report.md``) when the stage producing it ran, was restored or pulled in this
  flow run, or was verified up to date by it; otherwise a short summary of the run saying why
  there is no report, with the failed stages' first error lines.
* ``scoresde-mlflow-run`` (only with tracking): the MLflow parent run. For an http(s) tracking server
  a *link* artifact to the run's page in the MLflow UI (``<uri>/#/experiments/<exp>/runs/<run>``;
  Prefect stores a link artifact as markdown ``[text](url)``);
  a local store (``sqlite:///...``) has no URL, so a *markdown* artifact gives the run id, the
  experiment, the store and the ``mlflow ui`` command plus the page to open in it.

Publishing never fails a flow run: an error is logged as a warning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

STAGES_KEY = "scoresde-stages"
REPORT_KEY = "scoresde-report"
MLFLOW_KEY = "scoresde-mlflow-run"
MAX_MARKDOWN_CHARS = 200_000   # a report is ~10 kB; keep an accidental huge file out of the API


def stage_rows(order: list[str], results: dict[str, str], failures: dict, stats: dict[str, dict]) -> list[dict]:
    """One row per stage in pipeline order: stage, action, attempts, seconds."""
    rows = []
    for name in order:
        action = "failed" if name in failures else results.get(name, "not run")
        entry = stats.get(name, {})
        rows.append({"stage": name, "action": action, "attempts": int(entry.get("attempts", 0)),
                     "seconds": round(float(entry.get("seconds", 0.0)), 2)})
    return rows


def _owner(pipeline: Any, rel: str) -> str | None:
    target = Path(rel).as_posix()
    for name, spec in pipeline.stages.items():
        if any(Path(out).as_posix() == target for out in spec.outs):
            return name
    return None


def report_markdown(root: str, pipeline: Any, rows: list[dict], failures: dict, rel: str, status: str) -> tuple[str, str]:
    """(markdown, description) of the report artifact (see module docstring)."""
    owner = _owner(pipeline, rel)
    actions = {row["stage"]: row["action"] for row in rows}
    action = actions.get(owner) if owner else None
    path = Path(root) / rel
    if action in {"ran", "restored", "pulled", "skipped"} and path.is_file():
        how = "up to date, verified by this flow run" if action == "skipped" else f"{action} in this flow run"
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > MAX_MARKDOWN_CHARS:
            text = text[:MAX_MARKDOWN_CHARS] + f"\n\n… (truncated; full report in `{rel}`)\n"
        return text, f"`{rel}` from stage `{owner}` ({how})"
    if owner is None:
        why = f"`{rel}` is not an output of the stages this flow run selected"
    elif action is None or action.startswith("not run"):
        why = f"stage `{owner}` was not run ({action or 'not reached'})"
    else:
        why = f"stage `{owner}`: {action}"
    lines = [f"# Reproduction {status.lower()}", "", f"No Markdown report from this flow run: {why}.", "",
             "| stage | action | attempts | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['action']} | {r['attempts']} | {r['seconds']:.2f} |" for r in rows]
    if failures:
        lines += ["", "## Failures", ""]
        for name, err in failures.items():
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            lines.append(f"- `{name}`: {first[:500]}")
    return "\n".join(lines) + "\n", f"summary of the flow run (no report: {why})"


def publish(*, root: str, pipeline: Any, results: dict[str, str], failures: dict, stats: dict[str, dict],
            report_rel: str, status: str, parent_run_id: str | None, tracking_uri: str | None,
            experiment: str, logger: Any) -> dict[str, str]:
    """Create the flow run's artifacts; returns ``{key: artifact type}`` of those created."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    created: dict[str, str] = {}
    rows = stage_rows(list(pipeline.order), results, failures, stats)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["action"]] = counts.get(row["action"], 0) + 1
    summary = ", ".join(f"{n} {a}" for a, n in counts.items())

    def report() -> None:
        markdown, description = report_markdown(root, pipeline, rows, failures, report_rel, status)
        create_markdown_artifact(markdown, key=REPORT_KEY, description=description)

    steps = [
        (STAGES_KEY, "table", lambda: create_table_artifact(
            rows, key=STAGES_KEY, description=f"DVC stages of this flow run ({status}): {summary}")),
        (REPORT_KEY, "markdown", report),
    ]
    if parent_run_id and tracking_uri:
        steps.append((MLFLOW_KEY, "link" if tracking_uri.startswith(("http://", "https://")) else "markdown",
                      lambda: _mlflow_artifact(parent_run_id, tracking_uri, experiment)))
    for key, kind, make in steps:
        try:
            make()
            created[key] = kind
        except Exception as err:  # noqa: BLE001 - artifacts are a convenience, never a failure
            logger.warning("could not publish the Prefect artifact %r: %s", key, err)
    return created


def _mlflow_artifact(run_id: str, tracking_uri: str, experiment: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from pipeline.flow_tracking import run_link

    link = run_link(run_id, tracking_uri)
    if "url" in link:
        create_link_artifact(link["url"], link_text=f"MLflow parent run {run_id} ({experiment})", key=MLFLOW_KEY,
                             description="MLflow parent run of this flow run; its stage runs are nested under it")
        return
    create_markdown_artifact(
        "\n".join([
            "# MLflow parent run", "",
            f"- run id: `{run_id}`",
            f"- experiment: `{experiment}` (id {link['experiment_id']})",
            f"- tracking store: `{link['store']}` (a local store: no URL to link to)", "",
            "To browse it:", "", "```bash", link["command"], "```", "",
            f"then open {link['url_when_served']}",
        ]) + "\n",
        key=MLFLOW_KEY, description=f"MLflow parent run {run_id} ({experiment}) in a local store")
