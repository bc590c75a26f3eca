"""Stage `annealing` (the article's Figures 2 and 3): Langevin dynamics at one fixed σ versus annealed Langevin.

Both samplers run on the trained NCSN (models/ncsn.pt) with the same budget of L · `n_steps_each` score
evaluations and the same Uniform[0, 1] starting images:

- fixed σ ("no annealing"): `langevin` with s_θ(x, σ) at one level (default σ_L, the smallest;
  `fixed_sigma` picks another) and step α = ε σ²/σ_L², what annealed Langevin would use at that level;
- annealed: NCSN's Algorithm 1 over σ_1 > … > σ_L of data/noise/schedule.json (+ the final Tweedie
  denoising step when `denoise`).

The article reports that without annealing the images have the global structure but lack detail and
variety; here that is measured by FID / KID against the cached real-data reference ->
reports/metrics/annealing.json, and shown side by side in reports/figures/annealing.png.
Batch i of both samplers starts from seed + i; finished batches are kept in checkpoints/samples/annealing/
until the outputs are written, so a rerun after a crash draws only the missing ones (same metrics).
"""
from __future__ import annotations

from pipeline.io import read_json, write_json
from pipeline.params import COMMON, Bool, Float, Int, Optional, Section
from pipeline.schemas import DEVICE
from pipeline.stage import stage_main

METRICS = "reports/metrics/annealing.json"
FIGURE = "reports/figures/annealing.png"
SCHEMA = {**COMMON, "annealing": Section({
    "device": DEVICE,
    "use_ema": Bool(True),
    "n": Int(ge=2, le=10_000_000),
    "batch_size": Int(ge=1, le=1_000_000),
    "n_steps_each": Int(ge=1, le=100_000),
    "step_lr": Float(gt=0, le=10),
    "denoise": Bool(True),
    "fixed_sigma": Optional(Float(gt=0)),
    "n_show": Int(64, ge=1, le=1024),
})}


def run(params: dict, run, args) -> None:
    from pipeline.figures import panels
    from pipeline.comparison import sample_and_score
    from pipeline.generation import discard_batches, load_trained
    from pipeline.quality import describe
    from scoresde.distributed import resolve_device

    p, seed = params["annealing"], params["seed"]
    device = resolve_device(p["device"])
    schedule = read_json("data/noise/schedule.json")
    model, info = load_trained("models/ncsn.pt", device, use_ema=p["use_ema"])
    sigmas = schedule["sigmas"]
    sigma_fixed = p["fixed_sigma"] or float(sigmas[-1])
    common = {"batch_size": p["batch_size"], "n_steps_each": p["n_steps_each"], "step_lr": p["step_lr"]}
    configs = {"langevin_fixed_sigma": {**common, "sampler": "langevin", "sigma": p["fixed_sigma"], "denoise": False},
               "annealed_langevin": {**common, "sampler": "annealed_langevin", "denoise": p["denoise"]}}
    results, samples = sample_and_score("ncsn", model, configs, schedule, p["n"], device, seed,
                                        info.get("centered", False), run, "annealing")
    results["langevin_fixed_sigma"]["sigma"] = sigma_fixed

    titles = {"langevin_fixed_sigma": f"Langevin at fixed σ = {sigma_fixed:.3g} (no annealing)",
              "annealed_langevin": f"annealed Langevin, σ = {sigmas[0]:.3g} → {sigmas[-1]:.3g}, L = {len(sigmas)}"}
    panels(samples, {k: f"{t}\n{describe(results[k])}" for k, t in titles.items()}, p["n_show"],
           f"NCSN samples, {p['n_steps_each'] * len(sigmas)} Langevin steps each "
           f"({'EMA' if p['use_ema'] else 'raw'} weights)", FIGURE, width=5.0, height=5.4)
    write_json(METRICS, results)
    discard_batches("annealing")  # the outputs are written: the kept batches are spent
    run.set_tags({"checkpoint": "ema" if p["use_ema"] else "raw", "fixed_sigma": sigma_fixed})
    run.log_artifact(METRICS, "metrics")
    run.log_artifact(FIGURE, "figures")


main = stage_main("annealing", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
