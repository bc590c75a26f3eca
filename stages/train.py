"""Stage `train@{ncsn,ve,vp,subvp}`: fit one score model.

NCSN: discrete geometric σ's from the schedule with denoising score matching (`dsm_loss`,
λ(σ) = σ^anneal_power). VE / VP / subVP: the continuous-time objective (`sde_dsm_loss`). The training
engine (scoresde.training) keeps EMA weights, writes atomic checkpoints every `ckpt_every` steps to
checkpoints/<sde>/ and resumes from the newest valid one after an interruption; the loss curve is a
DVC plot and an MLflow metric history. Runs under `torchrun --nproc_per_node N` as DDP.

`make_sde` and `train_model` are reused by the ablation and toy stages.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from pipeline.params import COMMON, DEVICE, Bool, Float, Int, List, Optional, OrAuto, Section, Str
from pipeline.stage import atomic_path, is_rank_zero, stage_main, write_json

KINDS = ("ncsn", "ve", "vp", "subvp")

MODEL = Section({
    "name": Str(choices=("unet", "mlp")),
    "embedding": Str(choices=("fourier", "sinusoidal")),
    # U-Net
    "ch": Optional(Int(ge=4, le=1024)),
    "ch_mult": Optional(List(Int(ge=1, le=16), min_len=1, max_len=6)),
    "num_res_blocks": Optional(Int(ge=1, le=8)),
    "attn_resolutions": Optional(List(Int(ge=1))),
    "dropout": Optional(Float(ge=0, lt=1)),
    # MLP
    "hidden": Optional(Int(ge=4, le=8192)),
    "n_layers": Optional(Int(ge=1, le=32)),
})


# Training fast-path knobs (optional; defaults keep today's behaviour: on CPU "auto" is plain fp32 eager).
FAST_PATH = {
    "amp": OrAuto(Bool(), default="auto"),                        # autocast on CUDA (auto = off: see training.py)
    "amp_dtype": Str("auto", choices=("auto", "float16", "bfloat16")),  # auto = bf16 where supported
    "channels_last": OrAuto(Bool(), default="auto"),              # auto = on for CUDA image batches under amp
    "compile": Bool(False),                                       # torch.compile the training forward
    "optimizer_impl": Str("auto", choices=("auto", "fused", "foreach", "for_loop")),  # auto = fused on CUDA
}


def train_section(kind: str) -> Section:
    fields = {
        "steps": Int(ge=1, le=10_000_000),
        "batch_size": Int(ge=1, le=65_536),
        "lr": Float(gt=0, le=1),
        "warmup": Int(0, ge=0),
        "grad_clip": Optional(Float(gt=0)),
        "ema_decay": Float(ge=0, lt=1),
        "ckpt_every": Int(ge=1),
        "log_every": Int(ge=1),
        "centered": Bool(),
        "model": MODEL,
        # speed only (issue 7; scoresde.training.resolve_fast_path): "auto" = on where the device benefits
        **FAST_PATH,
    }
    if kind == "ncsn":
        fields["anneal_power"] = Float(2.0, ge=0, le=4)
    else:
        fields["likelihood_weighting"] = Bool(False)
    return Section(fields)


SCHEMA = {**COMMON, "train": Section({"device": DEVICE, **{k: train_section(k) for k in KINDS}})}


def make_sde(kind: str, schedule: dict, N: int | None = None):
    """The SDE of `kind` with the parameters resolved by the noise stage (None for discrete NCSN)."""
    if kind == "ncsn":
        return None
    from scoresde.sde import get_sde

    p = dict(schedule[kind])
    if N is not None:
        p["N"] = N
    return get_sde(kind, **p)


def what_is_trained(cfg: dict) -> dict:
    """A train section without its speed knobs: they do not change what is trained, so a run can resume
    from a checkpoint written with other ones (the checkpoint fingerprint is built from this)."""
    return {k: v for k, v in cfg.items() if k not in FAST_PATH}


def fingerprint(*parts) -> str:
    return hashlib.md5(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build_objective(kind: str, cfg: dict, schedule: dict, device):
    """loss_fn(model, x, generator) for `kind` — the only place where the training objective is chosen."""
    import torch

    from scoresde.losses import dsm_loss, sde_dsm_loss
    from scoresde.models import get_score_fn

    if kind == "ncsn":
        sigmas = torch.tensor(schedule["sigmas"], dtype=torch.float32, device=device)
        power = cfg.get("anneal_power", 2.0)
        return lambda model, x, g: dsm_loss(get_score_fn(model), x, sigmas, anneal_power=power, generator=g)
    sde = make_sde(kind, schedule)
    weighting = cfg.get("likelihood_weighting", False)
    return lambda model, x, g: sde_dsm_loss(sde, get_score_fn(model, sde), x, likelihood_weighting=weighting, generator=g)


def train_model(kind: str, cfg: dict, schedule: dict, x, device, run, ckpt_dir, fingerprint: str, seed: int = 0,
                progress: bool = True):
    """Train a score model for `kind` on data `x` (in [0, 1] for images); returns (model, ema, result)."""
    from scoresde.data import to_model_space
    from scoresde.models import build_model
    from scoresde.training import TrainConfig, train

    model_cfg = {k: v for k, v in cfg["model"].items() if v is not None}
    model = build_model(model_cfg, tuple(x.shape[1:]), seed=seed)  # seeded init: the run is reproducible
    data = to_model_space(x, cfg["centered"]) if x.dim() == 4 else x
    config = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], ema_decay=cfg["ema_decay"],
                         grad_clip=cfg["grad_clip"], warmup=cfg["warmup"], ckpt_every=cfg["ckpt_every"],
                         log_every=cfg["log_every"], seed=seed, device=str(device),
                         amp=cfg.get("amp", "auto") is True, amp_dtype=cfg.get("amp_dtype", "auto"),
                         channels_last=cfg.get("channels_last", "auto"), compile=cfg.get("compile", False),
                         optimizer_impl=cfg.get("optimizer_impl", "auto"))
    result = train(model, build_objective(kind, cfg, schedule, device), data, config, Path(ckpt_dir),
                   fingerprint=fingerprint, log_fn=lambda step, m: run.log_metrics(m, step=step), progress=progress)
    return result.model, result.ema, result


def run(params: dict, run, args) -> None:
    from scoresde.data import load_prepared
    from scoresde.training import resolve_device, save_model

    from pipeline.stage import read_json

    kind = args.sde
    cfg = params["train"][kind]
    device = resolve_device(params["train"]["device"])
    schedule = read_json("data/noise/schedule.json")
    data_file = Path("data/prepared/data.parquet")
    data = load_prepared(data_file, split="train")
    fp = fingerprint(kind, what_is_trained(cfg), schedule, params["seed"], hashlib.md5(data_file.read_bytes()).hexdigest())

    model, ema, result = train_model(kind, cfg, schedule, data.x, device, run, f"checkpoints/{kind}", fp, seed=params["seed"])
    if not is_rank_zero():
        return
    info = {"kind": kind, "centered": cfg["centered"], "model": {k: v for k, v in cfg["model"].items() if v is not None},
            "data_shape": list(data.x.shape[1:]), "dataset": data.meta.get("dataset"), "steps": result.final_step,
            "fingerprint": fp, "seed": params["seed"]}
    save_model(f"models/{kind}.pt", model, ema, info)

    losses = result.losses
    tail = [l for _, l in losses[-max(1, len(losses) // 10):]]
    with atomic_path(f"reports/plots/loss_{kind}.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "loss"])
            w.writerows(losses)
    metrics = {"final_loss": sum(tail) / len(tail), "steps": result.final_step, "seconds": result.seconds,
               "resumed_from_step": result.resumed_from or 0}
    write_json(f"reports/metrics/train_{kind}.json", metrics)
    run.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
    run.log_artifact(f"reports/plots/loss_{kind}.csv", "plots")
    print(f"[train@{kind}] {result.final_step} steps in {result.seconds:.1f} s, final loss {metrics['final_loss']:.4g}"
          + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))


main = stage_main("train", SCHEMA, run, sde_choices=KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
