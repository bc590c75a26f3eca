"""Stage `samplers`: one trained score SDE, several samplers — sample quality against compute (the
article's "Computation Cost" discussion, made concrete).

On the model of `samplers.sde` (models/<sde>.pt, VE by default) the same number of samples is drawn with
`pc` (reverse-diffusion predictor + Langevin corrector, N = 1000: 2N score evaluations), `reverse_diffusion`
(the predictor alone), `ode` (probability flow with scipy's adaptive RK45), `heun` (EDM's 2nd-order sampler,
18 levels = 35 evaluations) and `annealed_langevin` (NCSN's Algorithm 1 with the VE model read as a
σ-conditioned score; skipped with a note for VP / sub-VP). For each: FID / KID, NFE and seconds ->
reports/metrics/samplers.json, reports/samplers.md, the DVC plot reports/plots/samplers.csv and a figure.
"""
from __future__ import annotations

from pipeline.cost import COLUMNS, SAMPLERS_SECTION
from pipeline.io import atomic_path, read_json, write_csv, write_json
from pipeline.params import COMMON
from pipeline.stage import stage_main

METRICS = "reports/metrics/samplers.json"
TABLE = "reports/samplers.md"
PLOT = "reports/plots/samplers.csv"
FIGURE = "reports/figures/samplers.png"
SCHEMA = {**COMMON, "samplers": SAMPLERS_SECTION}


def run(params: dict, run, args) -> None:
    from pipeline.cost import markdown_table, method_configs, table_rows
    from pipeline.figures import panels
    from pipeline.comparison import sample_and_score
    from pipeline.generation import load_trained
    from pipeline.quality import describe
    from scoresde.distributed import resolve_device

    p, seed, kind = params["samplers"], params["seed"], params["samplers"]["sde"]
    device = resolve_device(p["device"])
    schedule = read_json("data/noise/schedule.json")
    model, info = load_trained(f"models/{kind}.pt", device, use_ema=p["use_ema"])
    configs, skipped = method_configs(p)
    for name, why in skipped.items():
        print(f"[samplers] {name}: skipped ({why})", flush=True)
    scored, samples = sample_and_score(kind, model, configs, schedule, p["n"], device, seed,
                                       info.get("centered", False), run, "samplers")
    results = {name: scored[name] if name in scored else {"skipped": skipped[name]} for name in p["run"]}

    rows = table_rows(results)
    write_csv(PLOT, COLUMNS, rows)
    with atomic_path(TABLE) as tmp:
        tmp.write_text(markdown_table(rows, kind, p["n"]))
    if samples:
        panels(samples, {k: f"{k}\n{describe(r)}\n{r['nfe']} NFE, {r['seconds']:.1f} s" for k, r in scored.items()},
               p["n_show"], f"samplers on the {kind.upper()} model", FIGURE)
    write_json(METRICS, {"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw", **results})
    run.set_tags({"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw"})
    for path, folder in ((METRICS, "metrics"), (TABLE, "tables"), (PLOT, "plots"), (FIGURE, "figures")):
        run.log_artifact(path, folder)
    print(markdown_table(rows, kind, p["n"]), flush=True)


main = stage_main("samplers", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
