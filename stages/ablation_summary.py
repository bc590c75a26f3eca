"""Stage `ablation_summary` (the article's Figure 4 in numbers): FID against σ_end.

Gathers reports/metrics/ablation_<σ_end>.json of every value of `ablation.sigma_ends` into the DVC plot
reports/plots/ablation.csv (σ_end, headline score, KID, NFE, seconds) and reports/figures/ablation_fid.png.
"""
from __future__ import annotations

from pipeline.ablation import ABLATION, PLOT, SUMMARY_COLUMNS, SUMMARY_FIGURE, summary_rows, value_name
from pipeline.io import save_figure, write_csv
from pipeline.params import COMMON
from pipeline.stage import stage_main

SCHEMA = {**COMMON, "ablation": ABLATION}


def run(params: dict, run, args) -> None:
    from pipeline.figures import pyplot

    rows = summary_rows(params["ablation"]["sigma_ends"])
    write_csv(PLOT, SUMMARY_COLUMNS, rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = sorted((r["sigma_end"], r["fid"]) for r in rows if r["fid"] is not None)
    ax.plot([s for s, _ in pts], [f for _, f in pts], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("σ_end (L = %d levels from σ_begin)" % params["ablation"]["num_levels"])
    ax.set_ylabel(rows[0]["metric"] if rows else "FID")
    ax.set_title("Figure 4: sample quality against the smallest noise level", fontsize=9)
    fig.tight_layout()
    save_figure(fig, SUMMARY_FIGURE)
    for r in rows:
        if r["fid"] is not None:
            v = value_name(r["sigma_end"])
            run.log_metrics({f"fid_sigma_end_{v}": r["fid"],
                             **({f"kid_sigma_end_{v}": r["kid"]} if r["kid"] is not None else {})})
        print(f"[ablation_summary] σ_end = {r['sigma_end']:g}: {r['metric']} = {r['fid']}", flush=True)
    run.log_artifact(PLOT, "plots")
    run.log_artifact(SUMMARY_FIGURE, "figures")


main = stage_main("ablation_summary", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
