"""Stage `ablation@{σ_end}` (the article's Figure 4) and `ablation_summary`: the effect of the smallest noise level.

The article keeps L = 10 noise levels, log-spaced from σ_begin, and varies σ_end ∈ {0.1, 0.01, 0.001}.
For one σ_end, ``python -m stages.ablation --sigma-end 0.01``:

1. σ_1 = σ_begin (from data/noise/schedule.json, i.e. the largest pairwise data distance by default) > … >
   σ_L = σ_end, geometric, L = ``ablation.num_levels``;
2. trains a (short) NCSN on the prepared data with those σ's (the train stage's ``train_model``, a
   ``train.ncsn``-shaped config in ``ablation.train``; checkpoints in checkpoints/ablation_<σ_end>/);
3. samples it with annealed Langevin (the sample stage's ``generate``, ``ablation.sample`` is
   ``sample.ncsn``-shaped);
4. writes a grid, reports/figures/ablation_sigma_end_<σ_end>.png, and FID / KID against the cached
   reference, reports/metrics/ablation_<σ_end>.json.

``python -m stages.ablation summary`` (stage `ablation_summary`) gathers the per-value metrics into
reports/plots/ablation.csv (a DVC plot of FID against σ_end) and reports/figures/ablation_fid.png.

The default sampler here has ``denoise: false``, as NCSN (2019) had: the final Tweedie step would remove
most of the σ_L-sized noise and hide part of the effect the article looks at. ε (``step_lr``) is kept fixed
across σ_end, as in the article (NCSN's code): since α_i = ε σ_i²/σ_L², σ_end also sets every step size —
with σ_end = 0.1 the chains barely move at the top levels (α_1 = ε (σ_1/0.1)², 100 times smaller than with
0.01) and keep σ_L-sized noise, with 0.001 the top-level steps are 100 times larger. Part of "the effect of
the noise parameters on convergence" the article reports is this coupling.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys

from pipeline.params import COMMON, DEVICE, Float, Int, List, ParamsError, Section, Str
from pipeline.stage import atomic_path, read_json, stage_main, write_json
from stages.sample import sample_section
from stages.train import train_section

SCHEDULE = "data/noise/schedule.json"
DATA = "data/prepared/data.parquet"
PLOT = "reports/plots/ablation.csv"
SUMMARY_FIGURE = "reports/figures/ablation_fid.png"


def _sampler_is_annealed(d: dict):
    if d["sample"]["sampler"] not in ("annealed_langevin", "langevin"):
        return "sample.sampler", "the NCSN of the ablation is sampled with annealed_langevin (or langevin)"
    return None


SCHEMA = {
    **COMMON,
    "ablation": Section({
        "sigma_ends": List(Float(gt=0), min_len=1),
        "num_levels": Int(10, ge=2, le=100_000),
        "device": DEVICE,
        "train": train_section("ncsn"),
        "sample": sample_section("ncsn"),
        "n_show": Int(64, ge=1, le=1024),
    }, checks=[_sampler_is_annealed]),
}


def value_name(value: float) -> str:
    """How a σ_end appears in stage and file names (``0.01`` -> ``0.01``), as DVC renders ``${item}``."""
    return str(value)


def metrics_path(value: str) -> str:
    return f"reports/metrics/ablation_{value}.json"


def figure_path(value: str) -> str:
    return f"reports/figures/ablation_sigma_end_{value}.png"


def ablation_schedule(schedule: dict, sigma_end: float, num_levels: int) -> dict:
    """The noise stage's schedule with σ_L = ``sigma_end`` and L = ``num_levels`` (σ_begin kept)."""
    from scoresde.noise import geometric_sigmas

    sigma_begin = float(schedule["sigma_begin"])
    if not sigma_end < sigma_begin:
        raise ParamsError("ablation.sigma_ends", f"expected every sigma_end < sigma_begin = {sigma_begin:.4g} "
                          f"(data/noise/schedule.json), got {sigma_end}")
    sigmas = geometric_sigmas(sigma_begin, sigma_end, num_levels)
    return {**schedule, "sigma_end": sigma_end, "num_levels": num_levels, "sigmas": [float(s) for s in sigmas]}


# ---------------------------------------------------------------------------------- one σ_end
def run(params: dict, run, args) -> None:
    import hashlib
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from scoresde.data import load_prepared
    from stages.annealing import describe, plot_grid, quality_metrics, save_figure
    from stages.sample import generate
    from stages.train import fingerprint, train_model, what_is_trained

    p, seed = params["ablation"], params["seed"]
    value = args.sigma_end
    try:
        sigma_end = float(value)
    except ValueError:
        raise ParamsError("--sigma-end", f"expected a number, got {value!r}") from None
    if not (sigma_end > 0 and math.isfinite(sigma_end)):
        raise ParamsError("--sigma-end", f"expected a positive number, got {value!r}")
    from scoresde.training import resolve_device

    device = resolve_device(p["device"])
    schedule = ablation_schedule(read_json(SCHEDULE), sigma_end, p["num_levels"])
    data = load_prepared(DATA, split="train")
    cfg = p["train"]
    fp = fingerprint("ablation", what_is_trained(cfg), schedule["sigmas"], seed, hashlib.md5(Path(DATA).read_bytes()).hexdigest())
    with torch.random.fork_rng(devices=[]):  # the network's initial weights come from the global RNG: seed them
        torch.manual_seed(seed)
        model, ema, result = train_model("ncsn", cfg, schedule, data.x, device, run, f"checkpoints/ablation_{value}",
                                         fp, seed=seed, progress=False)
    scfg = p["sample"]
    if scfg["use_ema"] and ema is not None:
        ema.copy_to(model)
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    x, nfe, seconds = generate("ncsn", model, scfg, schedule, scfg["n"], device, g, cfg["centered"])
    metrics = quality_metrics(x, seed, device)

    losses = [l for _, l in result.losses[-max(1, len(result.losses) // 10):]]
    out = {**metrics, "sigma_end": sigma_end, "sigma_begin": schedule["sigma_begin"], "num_levels": p["num_levels"],
           "nfe": nfe, "seconds": seconds, "n": scfg["n"], "train_steps": result.steps_done,
           "train_seconds": result.seconds, "final_loss": sum(losses) / len(losses) if losses else None,
           "sampler": scfg["sampler"], "checkpoint": "ema" if scfg["use_ema"] else "raw"}
    fig, ax = plt.subplots(figsize=(5, 5.4))
    plot_grid(ax, x, p["n_show"], f"σ_end = {value} (σ_begin = {schedule['sigma_begin']:.3g}, L = {p['num_levels']})"
              f"\n{describe(metrics)}")
    fig.tight_layout()
    save_figure(fig, figure_path(value))
    write_json(metrics_path(value), out)
    run.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float)) and v is not None})
    run.set_tags({"sigma_end": value, "sampler": scfg["sampler"], "checkpoint": out["checkpoint"]})
    run.log_artifact(metrics_path(value), "metrics")
    run.log_artifact(figure_path(value), "figures")
    print(f"[ablation@{value}] {describe(metrics)} ({result.steps_done} training steps in {result.seconds:.1f} s; "
          f"{nfe} NFE in {seconds:.1f} s)", flush=True)


# ------------------------------------------------------------------------------------- summary
SUMMARY_SCHEMA = {**COMMON, "ablation": SCHEMA["ablation"]}


def summary_rows(sigma_ends: list[float]) -> list[dict]:
    """One row per σ_end from reports/metrics/ablation_<σ_end>.json: sigma_end, fid, kid, metric, nfe, seconds."""
    rows = []
    for v in sigma_ends:
        m = read_json(metrics_path(value_name(v)))
        fid_key = next((k for k in m if k.startswith("fid_") or k.startswith("sliced_wasserstein_")), None)
        kid_key = next((k for k in m if k.startswith("kid_") and not k.startswith("kid_std_")), None)
        rows.append({"sigma_end": float(v), "fid": m.get(fid_key) if fid_key else None,
                     "kid": m.get(kid_key) if kid_key else None, "metric": fid_key or "",
                     "nfe": m.get("nfe"), "seconds": m.get("seconds")})
    return rows


def summary_run(params: dict, run, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.annealing import save_figure

    rows = summary_rows(params["ablation"]["sigma_ends"])
    with atomic_path(PLOT) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["sigma_end", "fid", "kid", "metric", "nfe", "seconds"])
            w.writeheader()
            w.writerows(rows)
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


# ---------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        return stage_main("ablation_summary", SUMMARY_SCHEMA, summary_run)(argv[1:])
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--sigma-end", default=None)
    known, _ = pre.parse_known_args(argv)
    name = f"ablation@{known.sigma_end}" if known.sigma_end else "ablation"
    return stage_main(name, SCHEMA, run,
                      extra_args=lambda ap: ap.add_argument("--sigma-end", required=True,
                                                            help="the smallest noise level, as written in the "
                                                                 "stage name (e.g. 0.01)"))(argv)


if __name__ == "__main__":
    raise SystemExit(main())
