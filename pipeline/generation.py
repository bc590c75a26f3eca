"""Trained models in, samples out: what the sample, annealing, ablation and samplers stages share.

- :func:`load_trained` rebuilds a model written by ``train@<kind>`` (weights-only loading, EMA weights
  by default);
- :func:`build_sampler` turns a ``sample.<kind>``-shaped config into a ``scoresde.sampling.Sampler``
  (the library's one sampler interface; :func:`resolve_step_lr` turns ``step_lr: auto`` into NCSNv2's ε)
  and :func:`score_function` gives it the score function it takes;
- :func:`generate` draws ``n`` samples in batches, optionally resumable batch by batch (batch i from seed + i,
  kept in a resume directory: :func:`resume_dir` names it, :func:`discard_batches` removes a stage's once its
  outputs are written);
- :func:`save_samples` writes them (uint8 .npz for images, float32 for points) and a PNG grid.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path, fingerprint
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
    """The model's score in the variable the sampler takes: σ for Langevin samplers, t for SDE samplers.

    NCSN and EDM networks are conditioned on σ: for the SDE / ODE samplers their score is read at
    σ(t) of the VE SDE ``make_sde`` gives them (NCSN's over its own [σ_L, σ_1], queried between its levels).
    """
    import torch

    from scoresde.models import get_score_fn
    from scoresde.sampling import sigma_conditioned

    if kind in ("ncsn", "edm") and sampler.conditioning == "sigma":
        return get_score_fn(model)
    sde = sampler.settings.get("sde") or make_sde(kind, schedule)
    if kind == "ncsn":
        score_sigma = get_score_fn(model)
        return lambda x, t: score_sigma(x, sde.noise_level(torch.as_tensor(t, device=x.device)))
    score_t = get_score_fn(model, sde)
    return sigma_conditioned(score_t, sde) if sampler.conditioning == "sigma" else score_t


def generate(kind: str, model, cfg: dict, schedule: dict, n: int, device, generator, centered: bool, *,
             seed: int | None = None, resume_dir=None):
    """Draw ``n`` samples with the sampler in ``cfg``; returns (x in data space, nfe per sample, seconds).

    With ``seed``, batch i draws from its own generator seeded ``seed + i`` (EDM's per-seed convention), so a
    batch does not depend on the batches before it; ``resume_dir`` then keeps each finished batch (written
    atomically) and a rerun after a crash loads those instead of drawing them again: the result is the
    same as an uninterrupted run's. Without ``seed``, all batches share ``generator``. ``seconds`` is the
    sampling time of all ``n`` samples: a kept batch counts with the time it took when it was drawn.
    A progress line is printed per batch drawn (none for kept ones; one line says how many were kept).
    """
    import torch

    from scoresde.checkpoint import atomic_torch_save
    from scoresde.data import from_model_space

    shape = tuple(schedule["data_shape"])
    sampler = build_sampler(kind, cfg, schedule, device)
    score_fn = score_function(kind, model, sampler, schedule)
    out, nfe, seconds, drawn = [], 0, 0.0, 0
    batches = list(range(0, n, cfg["batch_size"]))
    with torch.no_grad():
        for i, lo in enumerate(batches):
            b = min(cfg["batch_size"], n - lo)
            done = None if resume_dir is None else Path(resume_dir) / f"batch_{i:06d}.pt"
            kept = _load_batch(done, (b, *shape))
            if kept is not None:
                out.append(kept["x"])
                nfe, seconds = int(kept["nfe"]), seconds + float(kept.get("seconds", 0.0))
                continue
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(int(seed) + i)
            start = time.perf_counter()
            x, nfe = sampler(score_fn, (b, *shape), generator=generator, device=device)
            out.append(x.detach().float().cpu())
            took = time.perf_counter() - start
            seconds, drawn = seconds + took, drawn + 1
            if done is not None:
                atomic_torch_save({"x": out[-1], "nfe": int(nfe), "seconds": took}, done)
            if len(batches) > 1:
                print(f"[{cfg['sampler']}] batch {i + 1}/{len(batches)}: {lo + b}/{n} samples, "
                      f"{seconds:.1f} s", flush=True)
    if drawn < len(batches):
        print(f"[{cfg['sampler']}] {len(batches) - drawn} of {len(batches)} batches were kept from an interrupted "
              f"run ({resume_dir}); drew {drawn}", flush=True)
    x = torch.cat(out)
    if len(shape) == 3:
        x = from_model_space(x, centered)
    return x, int(nfe), seconds


def _load_batch(path: Path | None, shape: tuple) -> dict | None:
    """A batch kept by an interrupted run, or None (none kept; unreadable or of another shape: drawn again)."""
    from scoresde.checkpoint import CheckpointError, safe_load

    if path is None or not path.exists():
        return None
    try:
        kept = safe_load(path)  # weights_only; a torn write never carries this name
    except CheckpointError as e:
        print(f"warning: drawing batch {path.name} again: {e}", flush=True)
        return None
    if not isinstance(kept, dict) or "x" not in kept or tuple(kept["x"].shape) != shape:
        print(f"warning: drawing batch {path.name} again: it does not hold {shape} samples", flush=True)
        return None
    return kept


# Finished batches of the experiment stages (annealing, ablation@*, samplers): not a DVC output, gitignored.
RESUME_ROOT = Path("checkpoints/samples")


def weights_fingerprint(model) -> str:
    """md5 of a model's weights (names, dtypes, shapes, bytes): the samples' key part for the network."""
    import torch

    h = hashlib.md5()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resume_dir(stage: str, name: str, model, cfg: dict, schedule: dict, n: int, seed: int, device) -> Path:
    """Where :func:`generate` keeps the finished batches of sampler config ``name`` in ``stage``:
    ``checkpoints/samples/<stage>/<name>/<key>``. The key changes with anything that changes the samples
    (the weights, the sampler config, the schedule, n, the seed, the device type, torch's version and thread
    count), so a rerun with other settings never mixes in batches of the earlier ones."""
    import torch

    key = fingerprint(stage, name, weights_fingerprint(model), cfg, schedule, n, seed, torch.device(device).type,
                      torch.__version__, torch.get_num_threads())
    return RESUME_ROOT / stage / name / key[:12]


def kept_batches(directory) -> int:
    """How many finished batches ``directory`` holds."""
    return len(list(Path(directory).glob("batch_*.pt"))) if Path(directory).is_dir() else 0


def discard_batches(stage: str) -> None:
    """The outputs of ``stage`` are written: its kept batches (every config and key) are spent."""
    shutil.rmtree(RESUME_ROOT / stage, ignore_errors=True)


def save_samples(x, path_npz: str, path_png: str, title: str = "") -> None:
    """Samples as .npz (uint8 images or float32 points) and a PNG grid / scatter plot."""
    from pipeline.figures import save_sample_grid
    from scoresde.data import to_uint8

    arr = np.asarray(to_uint8(x)) if x.dim() == 4 else x.numpy().astype(np.float32)
    with atomic_path(path_npz) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, x=arr)
    save_sample_grid(x, path_png, title)

