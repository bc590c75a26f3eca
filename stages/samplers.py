"""Stage `samplers`: one trained score SDE, five samplers — sample quality against compute (the article's
"Computation Cost" discussion, made concrete).

On the model of ``samplers.sde`` (models/<sde>.pt, VE by default) the same number of samples is drawn with

- ``pc``: predictor-corrector, reverse-diffusion predictor + Langevin corrector, N = 1000 steps
  (Song et al., 2021, Alg. 2/3) — 2 N score evaluations;
- ``reverse_diffusion``: the predictor alone (corrector ``none``), N = 1000 — N evaluations;
- ``ode``: the probability-flow ODE with scipy's adaptive RK45 (Song et al., 2021, Eq. 13) — NFE chosen by
  the solver's tolerances;
- ``heun``: EDM's deterministic 2nd-order sampler (Karras et al., 2022), 18 levels = 35 evaluations;
- ``annealed_langevin``: NCSN's Algorithm 1 over the schedule's σ's with the VE model read as a
  σ-conditioned score (VE only; skipped with a note for VP / sub-VP).

For each: FID / KID against the cached reference (the extractor and n are in the metric names), the number
of score evaluations (NFE, per sample batch) and wall-clock seconds -> reports/metrics/samplers.json, a
table (reports/samplers.md and the DVC plot reports/plots/samplers.csv) and a figure of samples
(reports/figures/samplers.png). ``samplers.run`` lists the samplers to run; each one's keys are those
of a ``sample.<sde>`` section.
"""
from __future__ import annotations

import csv

from pipeline.params import COMMON, DEVICE, Bool, Int, List, Section, Str
from pipeline.stage import atomic_path, read_json, stage_main, write_json
from stages.sample import LANGEVIN_KINDS, sample_section

SCHEDULE = "data/noise/schedule.json"
METRICS = "reports/metrics/samplers.json"
TABLE = "reports/samplers.md"
PLOT = "reports/plots/samplers.csv"
FIGURE = "reports/figures/samplers.png"
SDES = ("ve", "vp", "subvp")

_F = sample_section("ve").fields  # the sample stage's field specs (types, bounds, defaults)


def _pick(*keys: str) -> dict:
    return {k: _F[k] for k in keys}


METHODS = {
    "pc": ("pc", Section(_pick("steps", "predictor", "corrector", "snr", "n_corrector_steps", "denoise"))),
    "reverse_diffusion": ("pc", Section(_pick("steps", "predictor", "corrector", "snr", "n_corrector_steps",
                                              "denoise"))),
    "ode": ("ode", Section(_pick("rtol", "atol"))),
    "heun": ("heun", Section(_pick("num_steps", "rho"))),
    "annealed_langevin": ("annealed_langevin", Section(_pick("n_steps_each", "step_lr", "denoise"))),
}


def _run_known(d: dict):
    for i, name in enumerate(d["run"]):
        if name not in METHODS:
            return f"run[{i}]", f"unknown sampler {name!r}; choose from {list(METHODS)}"
    if len(set(d["run"])) != len(d["run"]):
        return "run", "expected each sampler at most once"
    return None


SCHEMA = {
    **COMMON,
    "samplers": Section({
        "sde": Str("ve", choices=SDES),
        "device": DEVICE,
        "use_ema": Bool(True),
        "n": Int(ge=2, le=10_000_000),
        "batch_size": Int(ge=1, le=1_000_000),
        "run": List(Str(), min_len=1),
        "n_show": Int(36, ge=1, le=1024),
        **{name: spec for name, (_, spec) in METHODS.items()},
    }, checks=[_run_known]),
}


def method_config(p: dict, name: str) -> dict:
    """A sample.<sde>-shaped config for sampler ``name`` (defaults of the sample stage, then samplers.<name>)."""
    sampler, _ = METHODS[name]
    defaults = {k: spec.default for k, spec in _F.items() if spec.default is not ...}
    return {**defaults, **p[name], "sampler": sampler, "n": p["n"], "batch_size": p["batch_size"],
            "use_ema": p["use_ema"]}


def table_rows(results: dict) -> list[dict]:
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append({"sampler": name, "fid": None, "kid": None, "nfe": None, "seconds": None,
                         "seconds_per_1000": None, "metric": r["skipped"]})
            continue
        fid_key = next((k for k in r if k.startswith("fid_") or k.startswith("sliced_wasserstein_")), "")
        kid_key = next((k for k in r if k.startswith("kid_") and not k.startswith("kid_std_")), "")
        rows.append({"sampler": name, "fid": r.get(fid_key), "kid": r.get(kid_key), "nfe": r["nfe"],
                     "seconds": r["seconds"], "seconds_per_1000": r.get("seconds_per_1000"), "metric": fid_key})
    return rows


def markdown_table(rows: list[dict], sde: str, n: int) -> str:
    metric = next((r["metric"] for r in rows if r["fid"] is not None), "FID")
    lines = [f"# Samplers on the {sde.upper()} model ({n} samples each)", "",
             f"| sampler | {metric} | KID | NFE | seconds | s / 1000 samples |", "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if r["fid"] is None and r["nfe"] is None:
            lines.append(f"| {r['sampler']} | skipped: {r['metric']} | | | | |")
        else:
            lines.append(f"| {r['sampler']} | {fmt(r['fid'], '.4g')} | {fmt(r['kid'], '.4g')} | {r['nfe']} | "
                         f"{fmt(r['seconds'], '.1f')} | {fmt(r['seconds_per_1000'], '.0f')} |")
    lines += ["", "NFE = score-network evaluations per sample; seconds = wall-clock sampling time of all samples "
                  "(batched), also per 1000 samples."]
    return "\n".join(lines) + "\n"


def run(params: dict, run, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from stages.annealing import describe, plot_grid, quality_metrics, save_figure
    from stages.sample import generate, load_trained

    p, seed = params["samplers"], params["seed"]
    kind = p["sde"]
    from scoresde.training import resolve_device

    device = resolve_device(p["device"])
    schedule = read_json(SCHEDULE)
    model, info = load_trained(f"models/{kind}.pt", device, use_ema=p["use_ema"])

    results, samples = {}, {}
    for name in p["run"]:
        cfg = method_config(p, name)
        if cfg["sampler"] in ("annealed_langevin", "langevin") and kind not in LANGEVIN_KINDS:
            results[name] = {"skipped": f"{cfg['sampler']} needs a σ-conditioned (VE) model, not {kind}"}
            print(f"[samplers] {name}: skipped ({results[name]['skipped']})", flush=True)
            continue
        g = torch.Generator(device=device).manual_seed(seed)
        x, nfe, seconds = generate(kind, model, cfg, schedule, p["n"], device, g, info.get("centered", False))
        metrics = quality_metrics(x, seed, device)
        results[name] = {**metrics, "nfe": nfe, "seconds": seconds, "seconds_per_1000": 1000.0 * seconds / p["n"],
                         "n": p["n"], "sampler": cfg["sampler"]}
        samples[name] = x
        run.log_metrics({f"{name}_{k}": v for k, v in results[name].items() if isinstance(v, (int, float))})
        print(f"[samplers] {name}: {describe(metrics)}, {nfe} NFE, {seconds:.1f} s", flush=True)

    rows = table_rows(results)
    with atomic_path(PLOT) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["sampler", "fid", "kid", "nfe", "seconds", "seconds_per_1000", "metric"])
            w.writeheader()
            w.writerows(rows)
    with atomic_path(TABLE) as tmp:
        tmp.write_text(markdown_table(rows, kind, p["n"]))
    if samples:
        fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 4.2), squeeze=False)
        for ax, (name, x) in zip(axes[0], samples.items()):
            r = results[name]
            plot_grid(ax, x, p["n_show"], f"{name}\n{describe(r)}\n{r['nfe']} NFE, {r['seconds']:.1f} s")
        fig.suptitle(f"samplers on the {kind.upper()} model", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        save_figure(fig, FIGURE)
    write_json(METRICS, {"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw", **results})
    run.set_tags({"sde": kind, "checkpoint": "ema" if p["use_ema"] else "raw"})
    for path, folder in ((METRICS, "metrics"), (TABLE, "tables"), (PLOT, "plots"), (FIGURE, "figures")):
        run.log_artifact(path, folder)
    print(markdown_table(rows, kind, p["n"]), flush=True)


main = stage_main("samplers", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
