"""The noise schedule: params ``noise`` -> data/noise/schedule.json -> the objects training and sampling use.

``build_schedule`` resolves NCSN's geometric σ_1 > … > σ_L (σ_begin = the largest pairwise data distance
when ``auto``, NCSNv2 technique 1; L = ``num_levels`` from technique 2's ratio γ for the data dimension
when ``auto``, scoresde.tuning) and the VE / VP / subVP SDE parameters against the data;
``make_sde`` turns the JSON back into an SDE (the number of discretisation steps N belongs to the sampler
that discretises it, ``sample.<kind>.steps``); ``ablation_schedule`` is Figure 4's variant with another σ_L.
"""
from __future__ import annotations

from pipeline.params import Float, Int, OrAuto, ParamsError, Section, less_than
from pipeline.schemas import SDE_KINDS

EDM_DEFAULTS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}  # Karras et al. (2022), Table 1

NOISE = Section({
    "sigma_begin": OrAuto(Float(gt=0)),
    "sigma_end": Float(gt=0),
    "num_levels": OrAuto(Int(ge=2, le=100_000)),  # auto = NCSNv2 technique 2 (scoresde.tuning)
    "n_examples": Int(ge=1, le=64),
    "ve": Section({"sigma_min": Float(gt=0), "sigma_max": OrAuto(Float(gt=0))},
                  checks=[less_than("sigma_min", "sigma_max")]),
    "vp": Section({"beta_min": Float(gt=0), "beta_max": Float(gt=0)}, checks=[less_than("beta_min", "beta_max")]),
    "subvp": Section({"beta_min": Float(gt=0), "beta_max": Float(gt=0)}, checks=[less_than("beta_min", "beta_max")]),
    # EDM (Karras et al., 2022): noise levels σ in [σ_min, σ_max] (sampled as a VE process) and σ_data of its preconditioning
    "edm": Section({"sigma_min": Float(0.002, gt=0), "sigma_max": Float(80.0, gt=0), "sigma_data": Float(0.5, gt=0)},
                   checks=[less_than("sigma_min", "sigma_max")], default=EDM_DEFAULTS),
}, checks=[less_than("sigma_end", "sigma_begin")])


def build_schedule(p: dict, x) -> dict:
    """Resolve ``auto`` values against the data; raise ParamsError naming the field on a bad relation."""
    from scoresde.noise import geometric_sigmas, sigma_begin_from_data

    sigma_begin = float(sigma_begin_from_data(x)) if p["sigma_begin"] == "auto" else p["sigma_begin"]
    if not p["sigma_end"] < sigma_begin:
        raise ParamsError("noise.sigma_end", f"expected sigma_end < sigma_begin = {sigma_begin:.4g} (computed from "
                          f"the data), got {p['sigma_end']}")
    sigma_max = sigma_begin if p["ve"]["sigma_max"] == "auto" else p["ve"]["sigma_max"]
    if not p["ve"]["sigma_min"] < sigma_max:
        raise ParamsError("noise.ve.sigma_min", f"expected sigma_min < sigma_max = {sigma_max:.4g} (auto = sigma_begin), "
                          f"got {p['ve']['sigma_min']}")
    levels, extra = p["num_levels"], {}
    if levels == "auto":
        levels, extra = _ncsnv2_levels(x, sigma_begin, p["sigma_end"])
    sigmas = geometric_sigmas(sigma_begin, p["sigma_end"], levels)
    return {
        "sigma_begin": sigma_begin,
        "sigma_begin_source": "data" if p["sigma_begin"] == "auto" else "params",
        "sigma_end": p["sigma_end"],
        "num_levels": levels,
        "num_levels_source": "ncsnv2" if p["num_levels"] == "auto" else "params",
        **extra,
        "sigmas": [float(s) for s in sigmas],
        "ve": {"sigma_min": p["ve"]["sigma_min"], "sigma_max": float(sigma_max)},
        "vp": dict(p["vp"]),
        "subvp": dict(p["subvp"]),
        "edm": dict(p.get("edm") or EDM_DEFAULTS),
        "data_shape": list(x.shape[1:]),
    }


def _ncsnv2_levels(x, sigma_begin: float, sigma_end: float) -> tuple[int, dict]:
    """``num_levels: auto``: L from NCSNv2 technique 2 for D = the product of the data shape."""
    import math

    from scoresde.tuning import ncsnv2_gamma, ncsnv2_num_levels

    dim = math.prod(int(d) for d in x.shape[1:])
    try:
        levels = ncsnv2_num_levels(dim, sigma_begin, sigma_end)
    except ValueError as e:
        raise ParamsError("noise.num_levels",
                          f"'auto' (NCSNv2 technique 2) failed for data dimension {dim}: {e}") from None
    if levels > 100_000:
        raise ParamsError("noise.num_levels", f"'auto' gives L = {levels} levels (data dimension {dim}, "
                          f"sigma_begin {sigma_begin:.4g}, sigma_end {sigma_end}); expected at most 100000")
    return levels, {"ncsnv2_gamma": ncsnv2_gamma(dim)}


def make_sde(kind: str, schedule: dict, N: int | None = None):
    """The SDE of ``kind`` with the schedule's parameters; ``N`` = the number of discretisation steps of the
    sampler that will use it (the SDE's default when None). NCSN's σ-conditioned network, read as a
    continuous model for the ODE / SDE samplers, gets the VE SDE over its own range [σ_L, σ_1]; EDM the VE SDE
    over [σ_min, σ_max] (both networks are conditioned on σ; the samplers convert t to σ)."""
    from scoresde.sde import get_sde

    if kind == "ncsn":
        p = {"sigma_min": float(schedule["sigma_end"]), "sigma_max": float(schedule["sigma_begin"])}
        return get_sde("ve", **p, **({"N": N} if N is not None else {}))
    p = dict(schedule[kind])
    if kind == "edm":
        kind, p = "ve", {"sigma_min": p["sigma_min"], "sigma_max": p["sigma_max"]}
    if N is not None:
        p["N"] = N
    return get_sde(kind, **p)


def ablation_schedule(schedule: dict, sigma_end: float, num_levels: int) -> dict:
    """The noise stage's schedule with σ_L = ``sigma_end`` and L = ``num_levels`` (σ_begin kept)."""
    from scoresde.noise import geometric_sigmas

    sigma_begin = float(schedule["sigma_begin"])
    if not sigma_end < sigma_begin:
        raise ParamsError("ablation.sigma_ends", f"expected every sigma_end < sigma_begin = {sigma_begin:.4g} "
                          f"(data/noise/schedule.json), got {sigma_end}")
    sigmas = geometric_sigmas(sigma_begin, sigma_end, num_levels)
    return {**schedule, "sigma_end": sigma_end, "num_levels": num_levels, "sigmas": [float(s) for s in sigmas]}


def perturbed_examples(schedule: dict, x0, generator, n_times: int = 10) -> list[dict]:
    """x0 perturbed at each NCSN level σ_i and at ``n_times`` times t = 1/n … 1 of each SDE's forward marginal."""
    import numpy as np
    import torch

    rows = []
    for i, sigma in enumerate(schedule["sigmas"]):
        xt = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        rows += [{"process": "ncsn", "level": i, "value": sigma, "example": j, "x": xt[j].flatten().tolist()}
                 for j in range(len(x0))]
    for kind in SDE_KINDS:
        sde = make_sde(kind, schedule)
        centered = kind != "ve"
        x = 2 * x0 - 1 if centered and len(schedule["data_shape"]) == 3 else x0
        for i, t in enumerate(np.linspace(1.0 / n_times, 1.0, n_times)):
            tt = torch.full((len(x),), float(t), dtype=x.dtype)
            mean, std = sde.marginal_prob(x, tt)
            xt = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            rows += [{"process": kind, "level": i, "value": float(t), "example": j, "x": xt[j].flatten().tolist()}
                     for j in range(len(x))]
    return rows
