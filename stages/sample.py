"""Stage `sample@{ncsn,ve,vp,subvp}`: draw samples from a trained score model.

The sampler is chosen per model in params (`sample.<sde>.sampler`): annealed Langevin (NCSN's
Algorithm 1) by default for NCSN, predictor-corrector for the SDEs; `ode` (probability flow with an
adaptive solver), `heun` (EDM's 2nd-order sampler) and fixed-σ `langevin` are also available.
Writes data/samples/<sde>.npz, a PNG grid and NFE / seconds.

`load_trained` and `generate` are reused by the annealing, ablation and samplers stages.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.params import COMMON, DEVICE, Bool, Float, Int, Optional, ParamsError, Section, Str
from pipeline.stage import atomic_path, read_json, stage_main, write_json

KINDS = ("ncsn", "ve", "vp", "subvp")
SAMPLERS = ("annealed_langevin", "langevin", "pc", "ode", "heun")
LANGEVIN_KINDS = ("ncsn", "ve")  # samplers in σ-space need a σ-conditioned score


def sample_section(kind: str) -> Section:
    def compatible(d: dict):
        if d["sampler"] in ("annealed_langevin", "langevin") and kind not in LANGEVIN_KINDS:
            return "sampler", f"{d['sampler']!r} needs a σ-conditioned model (ncsn or ve), not {kind}; use pc, ode or heun"
        if d["sampler"] in ("pc", "ode", "heun") and kind == "ncsn":
            return "sampler", "ncsn is a discrete-σ model: use annealed_langevin or langevin"
        return None

    return Section({
        "sampler": Str(choices=SAMPLERS),
        "n": Int(ge=1, le=10_000_000),
        "batch_size": Int(ge=1, le=1_000_000),
        "use_ema": Bool(True),
        "denoise": Bool(True),
        # annealed / fixed-σ Langevin
        "n_steps_each": Int(100, ge=1, le=100_000),
        "step_lr": Float(4e-5, gt=0, le=10),
        "sigma": Optional(Float(gt=0)),  # fixed-σ Langevin: the σ used (default σ_L)
        # predictor-corrector
        "steps": Int(1000, ge=1, le=100_000),
        "predictor": Str("reverse_diffusion", choices=("euler_maruyama", "reverse_diffusion", "ancestral", "none")),
        "corrector": Str("langevin", choices=("langevin", "ald", "none")),
        "snr": Float(0.16, gt=0, le=10),
        "n_corrector_steps": Int(1, ge=0, le=100),
        # probability-flow ODE
        "rtol": Float(1e-5, gt=0, lt=1),
        "atol": Float(1e-5, gt=0, lt=1),
        # Heun (EDM)
        "num_steps": Int(18, ge=2, le=10_000),
        "rho": Float(7.0, gt=0),
    }, checks=[compatible])


SCHEMA = {**COMMON, "sample": Section({"device": DEVICE, **{k: sample_section(k) for k in KINDS}})}


def load_trained(path, device, use_ema: bool = True):
    """Rebuild a model saved by the train stage (weights_only loading); returns (model, info)."""
    from scoresde.models import EMA, build_model
    from scoresde.training import load_model_state

    state = load_model_state(path)
    info = state["config"]
    model = build_model(info["model"], tuple(info["data_shape"]))
    model.load_state_dict(state["model"])
    if use_ema:
        ema = EMA(model)
        ema.load_state_dict(state["ema"])
        ema.copy_to(model)
    return model.to(device).eval(), info


def _ve_sigma_score(model, sde):
    """A VE model's score as a function of σ (for Langevin samplers): t = log(σ/σ_min) / log(σ_max/σ_min)."""
    import math

    import torch

    from scoresde.models import get_score_fn

    score_t = get_score_fn(model, sde)
    log_ratio = math.log(sde.sigma_max / sde.sigma_min)

    def score_fn(x, sigma):
        t = torch.log(sigma / sde.sigma_min) / log_ratio
        return score_t(x, t)

    return score_fn


def generate(kind: str, model, cfg: dict, schedule: dict, n: int, device, generator, centered: bool, *,
             seed: int | None = None, resume_dir=None):
    """Draw `n` samples with the sampler in `cfg`; returns (x in data space, nfe per sample, seconds).

    With `seed`, batch i draws from its own generator seeded `seed + i` (EDM's per-seed convention), so a
    batch does not depend on the batches before it; `resume_dir` then keeps each finished batch (written
    atomically) and a rerun after a crash loads those instead of drawing them again: the result is the
    same as an uninterrupted run's. Without `seed`, all batches share `generator`.
    """
    import torch

    from scoresde.data import from_model_space
    from scoresde.models import get_score_fn
    from scoresde.sampling import annealed_langevin, heun_sampler, langevin, ode_sampler, pc_sampler
    from scoresde.training import atomic_torch_save, safe_load

    from stages.train import make_sde

    shape = tuple(schedule["data_shape"])
    sampler = cfg["sampler"]
    sde = make_sde(kind, schedule, N=cfg.get("steps"))
    sigmas = torch.tensor(schedule["sigmas"], dtype=torch.float32, device=device)
    if sampler in ("annealed_langevin", "langevin"):
        score_fn = get_score_fn(model) if kind == "ncsn" else _ve_sigma_score(model, sde)
    else:
        score_fn = get_score_fn(model, sde)

    out, nfe, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for i, lo in enumerate(range(0, n, cfg["batch_size"])):
            b = min(cfg["batch_size"], n - lo)
            bshape = (b, *shape)
            done = None if resume_dir is None else Path(resume_dir) / f"batch_{i:06d}.pt"
            if done is not None and done.exists():
                kept = safe_load(done)  # weights_only; a torn write never carries this name
                out.append(kept["x"])
                nfe = int(kept["nfe"])
                continue
            if seed is not None:
                generator = torch.Generator(device=device).manual_seed(int(seed) + i)
            if sampler == "annealed_langevin":
                # NCSN initialises annealed Langevin with uniform noise on the data range.
                x0 = torch.rand(bshape, generator=generator, device=device)
                x = annealed_langevin(score_fn, x0, sigmas, cfg["n_steps_each"], step_lr=cfg["step_lr"],
                                      denoise=cfg["denoise"], generator=generator)
                nfe = len(sigmas) * cfg["n_steps_each"] + int(cfg["denoise"])
            elif sampler == "langevin":
                # Langevin without annealing: one fixed σ, the same total number of steps, step size
                # α = ε σ²/σ_L² as annealed Langevin would use at that σ.
                sigma = cfg["sigma"] or float(sigmas[-1])
                steps = len(sigmas) * cfg["n_steps_each"]
                s = torch.full((b,), sigma, device=device)
                x0 = torch.rand(bshape, generator=generator, device=device)
                x = langevin(lambda y: score_fn(y, s), x0, cfg["step_lr"] * (sigma / float(sigmas[-1])) ** 2, steps,
                             generator=generator)
                nfe = steps
            elif sampler == "pc":
                x, nfe = pc_sampler(sde, score_fn, bshape, predictor=cfg["predictor"], corrector=cfg["corrector"],
                                    snr=cfg["snr"], n_corrector_steps=cfg["n_corrector_steps"], denoise=cfg["denoise"],
                                    generator=generator)
            elif sampler == "ode":
                x, nfe = ode_sampler(sde, score_fn, bshape, rtol=cfg["rtol"], atol=cfg["atol"], generator=generator)
            elif sampler == "heun":
                x, nfe = heun_sampler(sde, score_fn, bshape, num_steps=cfg["num_steps"], rho=cfg["rho"], generator=generator)
            else:  # validated earlier; kept for readers adding samplers
                raise ParamsError("sample.sampler", f"unknown sampler {sampler!r}")
            out.append(x.detach().float().cpu())
            if done is not None:
                atomic_torch_save({"x": out[-1], "nfe": int(nfe)}, done)
    seconds = time.perf_counter() - start
    x = torch.cat(out)
    if len(shape) == 3:
        x = from_model_space(x, centered)
    return x, int(nfe), seconds


def save_samples(x, path_npz: str, path_png: str, title: str = "") -> None:
    """Samples as .npz (uint8 images or float32 points) and a PNG grid / scatter plot."""
    from scoresde.data import to_uint8

    if x.dim() == 4:
        arr = np.asarray(to_uint8(x))
    else:
        arr = x.numpy().astype(np.float32)
    with atomic_path(path_npz) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=arr)
    with atomic_path(path_png) as tmp:
        if x.dim() == 4:
            from torchvision.utils import save_image

            k = min(len(x), 100)
            save_image(x[:k].float(), tmp, nrow=int(np.ceil(np.sqrt(k))), padding=1, format="png")
        else:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(4, 4))
            pts = x.numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
            ax.set_title(title, fontsize=9)
            fig.savefig(tmp, format="png", dpi=90)
            plt.close(fig)


def run(params: dict, run, args) -> None:
    from scoresde.training import resolve_device

    from stages.train import fingerprint

    kind = args.sde
    cfg = params["sample"][kind]
    device = resolve_device(params["sample"]["device"])
    schedule = read_json("data/noise/schedule.json")
    model_file = Path(f"models/{kind}.pt")
    model, info = load_trained(model_file, device, use_ema=cfg["use_ema"])
    # Finished batches survive a crash here; the key changes with anything that changes the samples.
    key = fingerprint(kind, cfg, schedule, params["seed"], device.type, hashlib.md5(model_file.read_bytes()).hexdigest())
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
    write_json(f"reports/metrics/sample_{kind}.json", metrics)
    run.log_metrics({"nfe": nfe, "seconds": seconds, "seconds_per_sample": seconds / cfg["n"]})
    run.set_tags({"sampler": cfg["sampler"], "checkpoint": metrics["checkpoint"]})
    run.log_artifact(f"reports/figures/samples_{kind}.png", "figures")
    print(f"[sample@{kind}] {cfg['n']} samples with {cfg['sampler']}: NFE {nfe}, {seconds:.1f} s")


main = stage_main("sample", SCHEMA, run, sde_choices=KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
