"""Stage `sample@{ncsn,ve,vp,subvp}`: draw samples from a trained score model.

The sampler is chosen per model in params (`sample.<kind>.sampler`): annealed Langevin (NCSN's
Algorithm 1) by default for NCSN, predictor-corrector for the SDEs; `ode` (probability flow with an
adaptive solver), `heun` (EDM's 2nd-order sampler) and fixed-σ `langevin` are also available
(scoresde.sampling.get_sampler). Batch i is drawn from seed + i and kept in checkpoints/samples/ until
the outputs are written, so a rerun after a crash draws only the missing batches.
Writes data/samples/<kind>.npz, a PNG grid and NFE / seconds.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.io import read_json, write_json
from pipeline.params import COMMON, Section
from pipeline.schemas import DEVICE, MODEL_KINDS, sample_section
from pipeline.stage import stage_main

SCHEMA = {**COMMON, "sample": Section({"device": DEVICE, **{k: sample_section(k) for k in MODEL_KINDS}})}


def run(params: dict, run, args) -> None:
    from pipeline.generation import generate, load_trained, resolve_step_lr, save_samples
    from pipeline.io import file_md5, fingerprint
    from scoresde.distributed import resolve_device

    kind = args.sde
    cfg = params["sample"][kind]
    device = resolve_device(params["sample"]["device"])
    schedule = read_json("data/noise/schedule.json")
    model_file = f"models/{kind}.pt"
    model, info = load_trained(model_file, device, use_ema=cfg["use_ema"])
    # Finished batches survive a crash here; the key changes with anything that changes the samples.
    key = fingerprint(kind, cfg, schedule, params["seed"], device.type, file_md5(model_file))
    resume_dir = Path("checkpoints/samples") / kind / key[:12]
    resumed = len(list(resume_dir.glob("batch_*.pt"))) if resume_dir.exists() else 0
    if resumed:
        print(f"[sample@{kind}] resuming: {resumed} finished batch(es) in {resume_dir}")
    x, nfe, seconds = generate(kind, model, cfg, schedule, cfg["n"], device, None, info["centered"],
                               seed=params["seed"], resume_dir=resume_dir)

    save_samples(x, f"data/samples/{kind}.npz", f"reports/figures/samples_{kind}.png", title=f"{kind}: {cfg['sampler']}")
    shutil.rmtree(resume_dir.parent, ignore_errors=True)  # outputs are written: the batches are spent
    metrics = {"nfe": nfe, "seconds": seconds, "n": cfg["n"], "sampler": cfg["sampler"],
               "checkpoint": "ema" if cfg["use_ema"] else "raw", "seconds_per_sample": seconds / cfg["n"],
               "resumed_batches": resumed}
    if cfg["sampler"] in ("annealed_langevin", "langevin"):  # the ε used (NCSNv2 technique 4 when auto)
        metrics["step_lr"] = resolve_step_lr(cfg, schedule)
    write_json(f"reports/metrics/sample_{kind}.json", metrics)
    run.log_metrics({"nfe": nfe, "seconds": seconds, "seconds_per_sample": seconds / cfg["n"]})
    run.set_tags({"sampler": cfg["sampler"], "checkpoint": metrics["checkpoint"]})
    run.log_artifact(f"reports/metrics/sample_{kind}.json", "metrics")
    run.log_artifact(f"reports/figures/samples_{kind}.png", "figures")
    print(f"[sample@{kind}] {cfg['n']} samples with {cfg['sampler']}: NFE {nfe}, {seconds:.1f} s")


main = stage_main("sample", SCHEMA, run, sde_choices=MODEL_KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
