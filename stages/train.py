"""Stage `train@{ncsn,ve,vp,subvp,edm}`: fit one score model.

NCSN: discrete geometric σ's from the schedule with denoising score matching; VE / VP / subVP: the
continuous-time objective; EDM: the preconditioned denoiser with EDM's loss (pipeline.trainer). EMA weights, atomic checkpoints every `ckpt_every` steps in
checkpoints/<kind>/, resumed from the newest valid one after an interruption; the loss curve is a DVC
plot and an MLflow metric history. Runs under `torchrun --nproc_per_node N` as DDP.
"""
from __future__ import annotations

from pipeline.io import read_json, write_json
from pipeline.params import COMMON, Section
from pipeline.schemas import DEVICE, MODEL_KINDS, train_section
from pipeline.stage import is_rank_zero, stage_main

SCHEMA = {**COMMON, "train": Section({"device": DEVICE, **{k: train_section(k) for k in MODEL_KINDS}})}
DATA = "data/prepared/data.parquet"


def run(params: dict, run, args) -> None:
    from pipeline.io import file_md5, fingerprint
    from pipeline.trainer import final_loss, model_config, train_model, what_is_trained, write_loss_curve
    from scoresde.checkpoint import save_model
    from scoresde.data import load_prepared
    from scoresde.distributed import resolve_device

    kind, seed = args.sde, params["seed"]
    cfg = params["train"][kind]
    device = resolve_device(params["train"]["device"])
    schedule = read_json("data/noise/schedule.json")
    data = load_prepared(DATA, split="train")
    fp = fingerprint(kind, what_is_trained(cfg), schedule, seed, file_md5(DATA))

    model, ema, result = train_model(kind, cfg, schedule, data.x, device, run, f"checkpoints/{kind}", fp, seed=seed)
    if not is_rank_zero():
        return
    info = {"kind": kind, "centered": cfg["centered"], "model": model_config(kind, cfg, schedule),
            "data_shape": list(data.x.shape[1:]), "dataset": data.meta.get("dataset"), "steps": result.final_step,
            "fingerprint": fp, "seed": seed}
    save_model(f"models/{kind}.pt", model, ema, info)
    write_loss_curve(f"reports/plots/loss_{kind}.csv", result.losses)
    metrics = {"final_loss": final_loss(result.losses), "steps": result.final_step, "seconds": result.seconds,
               "resumed_from_step": result.resumed_from or 0}
    write_json(f"reports/metrics/train_{kind}.json", metrics)
    run.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
    run.log_artifact(f"reports/metrics/train_{kind}.json", "metrics")
    run.log_artifact(f"reports/plots/loss_{kind}.csv", "plots")
    run.log_dataset(DATA, data.meta.get("dataset"))
    run.log_model(f"models/{kind}.pt", kind)  # registered as scoresde-<kind>
    print(f"[train@{kind}] {result.final_step} steps in {result.seconds:.1f} s, final loss {metrics['final_loss']:.4g}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))


main = stage_main("train", SCHEMA, run, sde_choices=MODEL_KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
