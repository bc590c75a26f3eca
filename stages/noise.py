"""Stage `noise`: the data-noising stage.

Computes the noise schedule — NCSN's geometric σ_1 > … > σ_L (σ_begin = the largest pairwise data
distance when `auto`, NCSNv2 technique 1) and the VE / VP / subVP SDE parameters — into
data/noise/schedule.json, which training and sampling read. Writes perturbed examples at every level
(Parquet) and a picture of the forward process: a PNG strip for images, scatter panels for 2-D data.
"""
from __future__ import annotations

import numpy as np

from pipeline.params import COMMON, Float, Int, OrAuto, ParamsError, Section, less_than
from pipeline.stage import atomic_path, stage_main, write_json

SCHEDULE = "data/noise/schedule.json"
PERTURBED = "data/noise/perturbed.parquet"
FIGURE = "reports/figures/forward_process.png"
N_TIMES = 10  # SDE marginals shown at t = 1/N … 1


def _beta(d):
    return less_than("beta_min", "beta_max")(d)


SCHEMA = {
    **COMMON,
    "noise": Section({
        "sigma_begin": OrAuto(Float(gt=0)),
        "sigma_end": Float(gt=0),
        "num_levels": Int(ge=2, le=100_000),
        "n_examples": Int(ge=1, le=64),
        "ve": Section({"sigma_min": Float(gt=0), "sigma_max": OrAuto(Float(gt=0)), "N": Int(ge=1)},
                      checks=[less_than("sigma_min", "sigma_max")]),
        "vp": Section({"beta_min": Float(gt=0), "beta_max": Float(gt=0), "N": Int(ge=1)}, checks=[_beta]),
        "subvp": Section({"beta_min": Float(gt=0), "beta_max": Float(gt=0), "N": Int(ge=1)}, checks=[_beta]),
    }, checks=[less_than("sigma_end", "sigma_begin")]),
}


def build_schedule(p: dict, x) -> dict:
    """Resolve `auto` values against the data; raise ParamsError naming the field on a bad relation."""
    from scoresde.noise import geometric_sigmas, sigma_begin_from_data

    sigma_begin = float(sigma_begin_from_data(x)) if p["sigma_begin"] == "auto" else p["sigma_begin"]
    if not p["sigma_end"] < sigma_begin:
        raise ParamsError("noise.sigma_end", f"expected sigma_end < sigma_begin = {sigma_begin:.4g} (computed from "
                          f"the data), got {p['sigma_end']}")
    sigma_max = sigma_begin if p["ve"]["sigma_max"] == "auto" else p["ve"]["sigma_max"]
    if not p["ve"]["sigma_min"] < sigma_max:
        raise ParamsError("noise.ve.sigma_min", f"expected sigma_min < sigma_max = {sigma_max:.4g} (auto = sigma_begin), "
                          f"got {p['ve']['sigma_min']}")
    sigmas = geometric_sigmas(sigma_begin, p["sigma_end"], p["num_levels"])
    return {
        "sigma_begin": sigma_begin,
        "sigma_begin_source": "data" if p["sigma_begin"] == "auto" else "params",
        "sigma_end": p["sigma_end"],
        "num_levels": p["num_levels"],
        "sigmas": [float(s) for s in sigmas],
        "ve": {"sigma_min": p["ve"]["sigma_min"], "sigma_max": float(sigma_max), "N": p["ve"]["N"]},
        "vp": dict(p["vp"]),
        "subvp": dict(p["subvp"]),
        "data_shape": list(x.shape[1:]),
    }


def perturbed_examples(schedule: dict, x0, generator) -> list[dict]:
    """x0 perturbed at each NCSN level σ_i and at N_TIMES times of each SDE's forward marginal."""
    import torch

    from stages.train import make_sde

    rows = []
    for i, sigma in enumerate(schedule["sigmas"]):
        xt = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        rows += [{"process": "ncsn", "level": i, "value": sigma, "example": j, "x": xt[j].flatten().tolist()}
                 for j in range(len(x0))]
    for kind in ("ve", "vp", "subvp"):
        sde = make_sde(kind, schedule)
        centered = kind != "ve"
        x = 2 * x0 - 1 if centered and len(schedule["data_shape"]) == 3 else x0
        for i, t in enumerate(np.linspace(1.0 / N_TIMES, 1.0, N_TIMES)):
            tt = torch.full((len(x),), float(t), dtype=x.dtype)
            mean, std = sde.marginal_prob(x, tt)
            xt = mean + std.reshape(-1, *([1] * (x.dim() - 1))) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            rows += [{"process": kind, "level": i, "value": float(t), "example": j, "x": xt[j].flatten().tolist()}
                     for j in range(len(x))]
    return rows


def plot_forward(schedule: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = schedule["data_shape"]
    processes = ["ncsn", "ve", "vp", "subvp"]
    if len(shape) == 1:  # 2-D points: one scatter panel per NCSN level
        levels = schedule["sigmas"]
        fig, axes = plt.subplots(1, len(levels), figsize=(2.2 * len(levels), 2.4), squeeze=False)
        for i, sigma in enumerate(levels):
            pts = np.array([r["x"] for r in rows if r["process"] == "ncsn" and r["level"] == i])
            ax = axes[0, i]
            ax.scatter(pts[:, 0], pts[:, 1], s=4)
            ax.set_title(f"σ={sigma:.3g}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    else:
        c, h, w = shape
        n_ex = min(2, max(r["example"] for r in rows) + 1)  # a strip: two examples per process
        rows = [r for r in rows if r["example"] < n_ex]
        ncols = max(len(schedule["sigmas"]), N_TIMES)
        fig, axes = plt.subplots(len(processes) * n_ex, ncols, figsize=(ncols * 0.8, len(processes) * n_ex * 0.8),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for p_i, proc in enumerate(processes):
            for r in rows:
                if r["process"] != proc:
                    continue
                img = np.asarray(r["x"], dtype=np.float32).reshape(c, h, w).transpose(1, 2, 0)
                # min-max per image: clipping to [0, 1] would hide the structure that survives the noise
                img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
                ax = axes[p_i * n_ex + r["example"], r["level"]]
                ax.imshow(img.squeeze(), cmap="gray" if c == 1 else None, vmin=0, vmax=1)
                if r["example"] == 0:
                    ax.set_title(f"{proc} {'σ' if proc == 'ncsn' else 't'}={r['value']:.2g}", fontsize=6)
    fig.suptitle("forward (noising) process: NCSN levels σ_i and VE / VP / subVP marginals p_t", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def run(params: dict, run, args) -> None:
    import pandas as pd
    import torch

    from scoresde.data import load_prepared

    data = load_prepared("data/prepared/data.parquet", split="train")
    schedule = build_schedule(params["noise"], data.x)
    g = torch.Generator().manual_seed(params["seed"])
    idx = torch.randperm(len(data.x), generator=g)[: params["noise"]["n_examples"]]
    rows = perturbed_examples(schedule, data.x[idx].double(), g)

    with atomic_path(PERTURBED) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, engine="pyarrow", index=False)
    plot_forward(schedule, rows, FIGURE)
    write_json(SCHEDULE, schedule)
    print(f"[noise] σ_begin={schedule['sigma_begin']:.4g} ({schedule['sigma_begin_source']}), σ_end={schedule['sigma_end']}, "
          f"L={schedule['num_levels']} -> {SCHEDULE}")
    run.log_metrics({"sigma_begin": schedule["sigma_begin"], "sigma_end": schedule["sigma_end"]})
    run.log_artifact(SCHEDULE)
    run.log_artifact(FIGURE, "figures")


main = stage_main("noise", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
