"""Trained models in, samples out: what the sample, annealing, ablation and samplers stages share.

- :func:`load_trained` rebuilds a model written by ``train@<kind>`` (weights-only loading, EMA weights
  by default);
- :func:`build_sampler` turns a ``sample.<kind>``-shaped config into a ``scoresde.sampling.Sampler``
  (the library's one sampler interface; :func:`resolve_step_lr` turns ``step_lr: auto`` into NCSNv2's ε)
  and :func:`score_function` gives it the score function it takes;
- :func:`generate` draws ``n`` samples in batches, optionally resumable batch by batch;
- :func:`save_samples` writes them (uint8 .npz for images, float32 for points) and a PNG grid.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path
from pipeline.schedule import make_sde


def load_trained(path, device, use_ema: bool = True):
    """Rebuild a model saved by the train stage (weights-only loading); returns (model, info)."""
    from scoresde.checkpoint import load_model_state
    from scoresde.ema import EMA
    from scoresde.models import build_model

    state = load_model_state(path)
    info = state["config"]
    model = build_model(info["model"], tuple(info["data_shape"]))
    model.load_state_dict(state["model"])
    if use_ema:
        ema = EMA(model)
        ema.load_state_dict(state["ema"])
        ema.copy_to(model)
    return model.to(device).eval(), info


def resolve_step_lr(cfg: dict, schedule: dict) -> float:
    """``cfg["step_lr"]``, or for ``auto`` NCSNv2 technique 4's ε for the schedule's σ's and
    ``cfg["n_steps_each"]`` (scoresde.tuning.ncsnv2_step_lr, in this project's ε convention)."""
    if cfg["step_lr"] != "auto":
        return float(cfg["step_lr"])
    from scoresde.tuning import ncsnv2_step_lr

    return ncsnv2_step_lr(schedule["sigmas"], cfg["n_steps_each"])


def build_sampler(kind: str, cfg: dict, schedule: dict, device):
    """The sampler named by ``cfg["sampler"]`` with the settings of ``cfg`` it takes (σ's from the schedule,
    or the SDE of ``kind`` discretised in ``cfg["steps"]`` steps)."""
    import torch

    from scoresde.sampling import get_sampler, sampler_settings

    accepted = sampler_settings(cfg["sampler"])
    settings = {k: cfg[k] for k in accepted if k in cfg and k not in ("sde", "sigmas")}
    if "step_lr" in settings:
        settings["step_lr"] = resolve_step_lr(cfg, schedule)
    if "sigmas" in accepted:
        settings["sigmas"] = torch.tensor(schedule["sigmas"], dtype=torch.float32, device=device)
    if "sde" in accepted:
        settings["sde"] = make_sde(kind, schedule, N=cfg.get("steps"))
    return get_sampler(cfg["sampler"], **settings)


def score_function(kind: str, model, sampler, schedule: dict):
    """The model's score in the variable the sampler takes: σ for Langevin samplers, t for SDE samplers."""
    from scoresde.models import get_score_fn
    from scoresde.sampling import sigma_conditioned

    if kind == "ncsn":
        return get_score_fn(model)  # discrete-σ model: conditioned on σ already
    sde = sampler.settings.get("sde") or make_sde(kind, schedule)
    score_t = get_score_fn(model, sde)
    return sigma_conditioned(score_t, sde) if sampler.conditioning == "sigma" else score_t


def generate(kind: str, model, cfg: dict, schedule: dict, n: int, device, generator, centered: bool, *,
             seed: int | None = None, resume_dir=None):
    """Draw ``n`` samples with the sampler in ``cfg``; returns (x in data space, nfe per sample, seconds).

    With ``seed``, batch i draws from its own generator seeded ``seed + i`` (EDM's per-seed convention), so a
    batch does not depend on the batches before it; ``resume_dir`` then keeps each finished batch (written
    atomically) and a rerun after a crash loads those instead of drawing them again: the result is the
    same as an uninterrupted run's. Without ``seed``, all batches share ``generator``.
    """
    import torch

    from scoresde.checkpoint import atomic_torch_save, safe_load
    from scoresde.data import from_model_space

    shape = tuple(schedule["data_shape"])
    sampler = build_sampler(kind, cfg, schedule, device)
    score_fn = score_function(kind, model, sampler, schedule)
    out, nfe, start = [], 0, time.perf_counter()
    batches = list(range(0, n, cfg["batch_size"]))
    with torch.no_grad():
        for i, lo in enumerate(batches):
            b = min(cfg["batch_size"], n - lo)
            done = None if resume_dir is None else Path(resume_dir) / f"batch_{i:06d}.pt"
            if done is not None and done.exists():
                kept = safe_load(done)  # weights_only; a torn write never carries this name
                out.append(kept["x"])
                nfe = int(kept["nfe"])
                continue
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(int(seed) + i)
            x, nfe = sampler(score_fn, (b, *shape), generator=generator, device=device)
            out.append(x.detach().float().cpu())
            if done is not None:
                atomic_torch_save({"x": out[-1], "nfe": int(nfe)}, done)
            if len(batches) > 1:
                print(f"[{cfg['sampler']}] batch {i + 1}/{len(batches)}: {lo + b}/{n} samples, "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    seconds = time.perf_counter() - start
    x = torch.cat(out)
    if len(shape) == 3:
        x = from_model_space(x, centered)
    return x, int(nfe), seconds


def save_samples(x, path_npz: str, path_png: str, title: str = "") -> None:
    """Samples as .npz (uint8 images or float32 points) and a PNG grid / scatter plot."""
    from pipeline.figures import save_sample_grid
    from scoresde.data import to_uint8

    arr = np.asarray(to_uint8(x)) if x.dim() == 4 else x.numpy().astype(np.float32)
    with atomic_path(path_npz) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, x=arr)
    save_sample_grid(x, path_png, title)

