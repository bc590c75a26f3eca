"""Stage `ablation@{σ_end}` (the article's Figure 4): the effect of the smallest noise level.

The article keeps L = 10 noise levels, log-spaced from σ_begin, and varies σ_end ∈ {0.1, 0.01, 0.001}.
For one σ_end (`python -m stages.ablation --sigma-end 0.01`): σ_1 = σ_begin (data/noise/schedule.json) >
… > σ_L = σ_end; a short NCSN trained on them (`ablation.train`, train.ncsn-shaped; checkpoints in
checkpoints/ablation_<σ_end>/), sampled with annealed Langevin (`ablation.sample`, sample.ncsn-shaped),
scored by FID / KID -> reports/metrics/ablation_<σ_end>.json and a grid of samples. Batch i is drawn from
seed + i and kept in checkpoints/samples/ablation_<σ_end>/ until the outputs are written: a rerun after a
crash resumes training from its last checkpoint and draws only the missing batches (same metrics).

The default sampler has `denoise: false`, as NCSN (2019) had: the final Tweedie step would remove most of
the σ_L-sized noise and hide part of the effect. ε (`step_lr`) is fixed across σ_end, as in the article:
since α_i = ε σ_i²/σ_L², σ_end also sets every step size (σ_end = 0.1 gives top-level steps 100 times
smaller than 0.01) — part of the effect of the noise parameters on convergence the article reports.
"""
from __future__ import annotations

from pipeline.ablation import ABLATION, figure_path, metrics_path
from pipeline.io import read_json, write_json
from pipeline.params import COMMON, Float
from pipeline.stage import stage_main

DATA = "data/prepared/data.parquet"
SCHEMA = {**COMMON, "ablation": ABLATION}
SIGMA_END = Float(gt=0)  # --sigma-end, validated like a params value


def run(params: dict, run, args) -> None:
    import torch

    from pipeline.figures import panels
    from pipeline.generation import discard_batches, generate, resume_dir
    from pipeline.io import file_md5, fingerprint
    from pipeline.quality import describe, sample_quality
    from pipeline.schedule import ablation_schedule
    from pipeline.trainer import final_loss, train_model, what_is_trained
    from scoresde.data import load_prepared
    from scoresde.distributed import resolve_device

    p, seed, value = params["ablation"], params["seed"], args.sigma_end
    sigma_end = SIGMA_END.validate(_number(value), "--sigma-end")
    device = resolve_device(p["device"])
    schedule = ablation_schedule(read_json("data/noise/schedule.json"), sigma_end, p["num_levels"])
    data = load_prepared(DATA, split="train")
    cfg, scfg = p["train"], p["sample"]
    fp = fingerprint("ablation", what_is_trained(cfg), schedule["sigmas"], seed, file_md5(DATA))
    with torch.random.fork_rng(devices=[]):  # the network's initial weights come from the global RNG: seed them
        torch.manual_seed(seed)
        model, ema, result = train_model("ncsn", cfg, schedule, data.x, device, run, f"checkpoints/ablation_{value}",
                                         fp, seed=seed, progress=False)
    if scfg["use_ema"] and ema is not None:
        ema.copy_to(model)
    model.eval()
    where = resume_dir(f"ablation_{value}", "annealed_langevin", model, scfg, schedule, scfg["n"], seed, device)
    x, nfe, seconds = generate("ncsn", model, scfg, schedule, scfg["n"], device, None, cfg["centered"], seed=seed,
                               resume_dir=where)
    metrics = sample_quality(x, seed, device)

    out = {**metrics, "sigma_end": sigma_end, "sigma_begin": schedule["sigma_begin"], "num_levels": p["num_levels"],
           "nfe": nfe, "seconds": seconds, "train_steps": result.final_step, "train_seconds": result.seconds,
           "final_loss": final_loss(result.losses), "sampler": scfg["sampler"],
           "checkpoint": "ema" if scfg["use_ema"] else "raw"}
    panels({value: x}, {value: f"σ_end = {value} (σ_begin = {schedule['sigma_begin']:.3g}, L = {p['num_levels']})"
                               f"\n{describe(metrics)}"}, p["n_show"], "", figure_path(value), width=5.0, height=5.4)
    write_json(metrics_path(value), out)
    discard_batches(f"ablation_{value}")  # the outputs are written: the kept batches are spent
    run.log_metrics({k: v for k, v in out.items() if isinstance(v, (int, float)) and v is not None})
    run.set_tags({"sigma_end": value, "sampler": scfg["sampler"], "checkpoint": out["checkpoint"]})
    run.log_artifact(metrics_path(value), "metrics")
    run.log_artifact(figure_path(value), "figures")
    print(f"[ablation@{value}] {describe(metrics)} ({result.final_step} training steps in {result.seconds:.1f} s; "
          f"{nfe} NFE in {seconds:.1f} s)", flush=True)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # the spec's validation names --sigma-end and the bad value


main = stage_main("ablation", SCHEMA, run, extra_args=lambda ap: ap.add_argument(
    "--sigma-end", required=True, help="the smallest noise level, as written in the stage name (e.g. 0.01)"))

if __name__ == "__main__":
    raise SystemExit(main())
