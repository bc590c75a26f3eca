"""Stage `report`: reports/report.md + self-contained reports/report.html from the MLflow runs.

The report reads the runs of `experiment` back from the tracking store (pipeline.report): each stage
run's metrics JSON artifact (the structured numbers the stage wrote) and its tags, the model kinds and
σ_end values from the params file, the claims from pipeline.claims. It shows the current reproduction
(this process's run group) beside up to `report.max_groups` earlier ones. The metrics files listed as
deps in dvc.yaml make DVC re-run the report when a result changes. Any set of runs can be reported later
with `python -m pipeline.report --experiment NAME --runs GROUP ...`.
"""
from __future__ import annotations

from pipeline.params import COMMON, Int, Section
from pipeline.stage import stage_main

SCHEMA = {**COMMON, "report": Section({"max_groups": Int(5, ge=0, le=1000)})}
OUT_DIR = "reports"


def run(params: dict, run, args) -> None:
    from pipeline.report import generate
    from pipeline.tracking import run_group

    group = run_group()
    md, page = generate(params["experiment"], None, OUT_DIR, f"{OUT_DIR}/figures", params["report"]["max_groups"],
                        primary=group, params=args.params)  # model kinds and sigma_end values from the params file
    size_kb = page.stat().st_size / 1024
    print(f"[report] {md}, {page} ({size_kb:.0f} KiB, self-contained) for run group {group}", flush=True)
    run.log_metrics({"report_kib": size_kb})
    run.log_artifact(str(page), "report")
    run.log_artifact(str(md), "report")
    for path in (page, md):  # also on the reproduction's parent run
        run.log_to_parent(path, "report")


main = stage_main("report", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
