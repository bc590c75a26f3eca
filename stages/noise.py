"""Stage `noise`: the noise schedule and a picture of the forward (noising) process.

Resolves NCSN's geometric σ_1 > … > σ_L (σ_begin = the largest pairwise data distance when `auto`,
NCSNv2 technique 1) and the VE / VP / subVP SDE parameters into data/noise/schedule.json, which training
and sampling read (pipeline.schedule). Writes perturbed examples at every level (Parquet) and the
forward process as a figure: a PNG strip for images, scatter panels for 2-D data.
"""
from __future__ import annotations

from pipeline.io import atomic_path, write_json
from pipeline.params import COMMON
from pipeline.schedule import NOISE
from pipeline.stage import stage_main

SCHEDULE = "data/noise/schedule.json"
PERTURBED = "data/noise/perturbed.parquet"
FIGURE = "reports/figures/forward_process.png"
N_TIMES = 10  # SDE marginals shown at t = 1/N … 1

SCHEMA = {**COMMON, "noise": NOISE}


def run(params: dict, run, args) -> None:
    import pandas as pd
    import torch

    from pipeline.figures import plot_forward
    from pipeline.schedule import build_schedule, perturbed_examples
    from scoresde.data import load_prepared

    data = load_prepared("data/prepared/data.parquet", split="train")
    schedule = build_schedule(params["noise"], data.x)
    g = torch.Generator().manual_seed(params["seed"])
    idx = torch.randperm(len(data.x), generator=g)[: params["noise"]["n_examples"]]
    rows = perturbed_examples(schedule, data.x[idx].double(), g, N_TIMES)

    with atomic_path(PERTURBED) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, engine="pyarrow", index=False)
    plot_forward(schedule, rows, FIGURE, N_TIMES)
    write_json(SCHEDULE, schedule)
    print(f"[noise] σ_begin={schedule['sigma_begin']:.4g} ({schedule['sigma_begin_source']}), "
          f"σ_end={schedule['sigma_end']}, L={schedule['num_levels']} -> {SCHEDULE}")
    run.log_metrics({"sigma_begin": schedule["sigma_begin"], "sigma_end": schedule["sigma_end"]})
    run.log_artifact(SCHEDULE)
    run.log_artifact(FIGURE, "figures")


main = stage_main("noise", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
