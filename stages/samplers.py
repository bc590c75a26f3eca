"""Stage `samplers@{model}`: one trained score model, several samplers — sample quality against compute
(the article's "Computation Cost" discussion, made concrete), for each model of `samplers.models`.

On models/<sde>.pt (VE and EDM by default) the same number of samples is drawn with `pc` (reverse-diffusion
predictor + Langevin corrector, N = 1000: 2N score evaluations), `reverse_diffusion` (the predictor alone),
`ode` (probability flow with scipy's adaptive RK45), `heun` (EDM's 2nd-order sampler, 18 levels = 35
evaluations), `dpm_solver_10` / `dpm_solver_20` (DPM-Solver++(2M), 10 / 20 evaluations) and
`annealed_langevin` (NCSN's Algorithm 1 on the σ-conditioned score; skipped with a note for VP / sub-VP).
For each: FID ± bootstrap std, KID, NFE and seconds -> reports/metrics/samplers_<sde>.json,
reports/samplers_<sde>.md, the DVC plot reports/plots/samplers_<sde>.csv and a figure.
Batch i of every sampler starts from seed + i; finished batches are kept in checkpoints/samples/samplers@<sde>/
until the outputs are written, so a rerun after a crash draws only the missing ones (same metrics).
"""
from __future__ import annotations

from pipeline.cost import COLUMNS, SAMPLERS_SECTION
from pipeline.io import atomic_path, read_json, write_csv, write_json
from pipeline.params import COMMON
from pipeline.schemas import MODEL_KINDS
from pipeline.stage import stage_main

METRICS = "reports/metrics/samplers_{}.json"
TABLE = "reports/samplers_{}.md"
PLOT = "reports/plots/samplers_{}.csv"
FIGURE = "reports/figures/samplers_{}.png"
SCHEMA = {**COMMON, "samplers": SAMPLERS_SECTION}


def run(params: dict, run, args) -> None:
    from pipeline.cost import markdown_table, method_configs, table_rows
    from pipeline.figures import panels
    from pipeline.comparison import sample_and_score
    from pipeline.generation import discard_batches, load_trained
    from pipeline.quality import describe
    from scoresde.distributed import resolve_device

    p, seed, kind = params["samplers"], params["seed"], args.sde
    metrics, table, plot, figure = (path.format(kind) for path in (METRICS, TABLE, PLOT, FIGURE))
    device = resolve_device(p["device"])
    schedule = read_json("data/noise/schedule.json")
    model, info = load_trained(f"models/{kind}.pt", device, use_ema=p["use_ema"])
    configs, skipped = method_configs(p, kind)
    for name, why in skipped.items():
        print(f"[samplers] {name}: skipped ({why})", flush=True)
    scored, samples = sample_and_score(kind, model, configs, schedule, p["n"], device, seed,
                                       info.get("centered", False), run, f"samplers@{kind}")
    results = {name: scored[name] if name in scored else {"skipped": skipped[name]} for name in p["run"]}

    rows = table_rows(results, kind)
    write_csv(plot, COLUMNS, rows)
    with atomic_path(table) as tmp:
        tmp.write_text(markdown_table(rows, kind, p["n"]))
    if samples:
        panels(samples, {k: f"{k}\n{describe(r)}\n{r['nfe']} NFE, {r['seconds']:.1f} s" for k, r in scored.items()},
               p["n_show"], f"samplers on the {kind.upper()} model", figure)
    write_json(metrics, {"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw", **results})
    discard_batches(f"samplers@{kind}")  # the outputs are written: the kept batches are spent
    run.set_tags({"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw"})
    for path, folder in ((metrics, "metrics"), (table, "tables"), (plot, "plots"), (figure, "figures")):
        run.log_artifact(path, folder)
    print(markdown_table(rows, kind, p["n"]), flush=True)


main = stage_main("samplers", SCHEMA, run, sde_choices=MODEL_KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
