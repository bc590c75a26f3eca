"""Training a score model from a ``train.<kind>``-shaped config: what train@*, ablation@* and the toy share.

NCSN (``kind == "ncsn"``): discrete geometric σ's from the schedule, denoising score matching
(``dsm_loss``, λ(σ) = σ^anneal_power). VE / VP / subVP: the continuous-time objective (``sde_dsm_loss``).
EDM: the preconditioned denoiser D(x; σ) (``build_model`` with ``precond: edm`` and the schedule's σ_data)
trained with EDM's loss (ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_data²)/(σ σ_data)²; scoresde.edm).
The engine (``scoresde.training.train``) keeps EMA weights, writes atomic checkpoints every
``ckpt_every`` steps and resumes from the newest one whose fingerprint matches.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.io import write_csv
from pipeline.schedule import make_sde
from pipeline.schemas import FAST_PATH


def what_is_trained(cfg: dict) -> dict:
    """A train section without its speed knobs: they do not change what is trained, so a run can resume
    from a checkpoint written with other ones (the checkpoint fingerprint is built from this)."""
    return {k: v for k, v in cfg.items() if k not in FAST_PATH}


def build_objective(kind: str, cfg: dict, schedule: dict, device):
    """loss_fn(model, x, generator) for ``kind`` — the only place where the training objective is chosen."""
    import torch

    from scoresde.losses import get_objective

    if kind == "ncsn":
        sigmas = torch.tensor(schedule["sigmas"], dtype=torch.float32, device=device)
        return get_objective("dsm", sigmas=sigmas, anneal_power=cfg.get("anneal_power", 2.0))
    if kind == "edm":
        return get_objective("edm", P_mean=cfg["P_mean"], P_std=cfg["P_std"],
                             sigma_data=float(schedule["edm"]["sigma_data"]))
    return get_objective("sde_dsm", sde=make_sde(kind, schedule),
                         likelihood_weighting=cfg.get("likelihood_weighting", False))


def model_config(kind: str, cfg: dict, schedule: dict) -> dict:
    """The ``build_model`` config of ``train.<kind>.model`` (EDM: wrapped in its preconditioning)."""
    model_cfg = {k: v for k, v in cfg["model"].items() if v is not None}
    if kind == "edm":
        model_cfg.update(precond="edm", sigma_data=float(schedule["edm"]["sigma_data"]))
    return model_cfg


def train_model(kind: str, cfg: dict, schedule: dict, x, device, run, ckpt_dir, fingerprint: str, seed: int = 0,
                progress: bool = True):
    """Train a score model for ``kind`` on data ``x`` (in [0, 1] for images); returns (model, ema, result)."""
    from scoresde.data import to_model_space
    from scoresde.models import build_model
    from scoresde.training import TrainConfig, train

    model = build_model(model_config(kind, cfg, schedule), tuple(x.shape[1:]), seed=seed)  # seeded init: the run is reproducible
    data = to_model_space(x, cfg["centered"]) if x.dim() == 4 else x
    config = TrainConfig(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], ema_decay=cfg["ema_decay"],
                         ema_warmup=cfg.get("ema_warmup", True),
                         grad_clip=cfg["grad_clip"], warmup=cfg["warmup"], ckpt_every=cfg["ckpt_every"],
                         log_every=cfg["log_every"], seed=seed, device=str(device),
                         amp=cfg.get("amp", "auto") is True, amp_dtype=cfg.get("amp_dtype", "auto"),
                         channels_last=cfg.get("channels_last", "auto"), compile=cfg.get("compile", False),
                         optimizer_impl=cfg.get("optimizer_impl", "auto"))
    result = train(model, build_objective(kind, cfg, schedule, device), data, config, Path(ckpt_dir),
                   fingerprint=fingerprint, log_fn=lambda step, m: run.log_metrics(m, step=step), progress=progress)
    return result.model, result.ema, result


def final_loss(losses: list[tuple[int, float]]) -> float | None:
    """Mean loss over the last tenth of the logged (step, loss) pairs (None when nothing was logged)."""
    tail = [loss for _, loss in losses[-max(1, len(losses) // 10):]]
    return sum(tail) / len(tail) if tail else None


def write_loss_curve(path: str, losses: list[tuple[int, float]]) -> None:
    write_csv(path, ["step", "loss"], losses)
