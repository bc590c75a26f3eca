"""Stage `annealing` (the article's Figures 2 and 3): Langevin dynamics at one fixed σ versus annealed Langevin.

Both samplers run on the trained NCSN (models/ncsn.pt) with the same budget of L · ``n_steps_each``
score evaluations and the same Uniform[0, 1] starting images:

- **fixed σ** ("no annealing"): ``langevin`` with the score s_θ(x, σ) at one level (default σ_L, the
  smallest; ``fixed_sigma`` picks another) and step α = ε σ²/σ_L² — what annealed Langevin would use at
  that level (the sample stage's ``langevin`` sampler).
- **annealed**: NCSN's Algorithm 1 over σ_1 > … > σ_L of data/noise/schedule.json (+ the final Tweedie
  denoising step when ``denoise``).

The article reports that without annealing the images have the global structure but lack detail and
variety (Figs 2/3). Here that is measured by FID / KID against the cached real-data reference
(``fid_ref``; the extractor and the number of samples are in the metric names, e.g.
``fid_digits_cnn_n500``) -> reports/metrics/annealing.json, and shown side by side in
reports/figures/annealing.png.

:func:`quality_metrics` (FID/KID of images, or sliced Wasserstein / mode-weight error for toy points) and
:func:`plot_grid` are reused by the ablation and samplers stages.
"""
from __future__ import annotations

from pipeline.params import COMMON, DEVICE, Bool, Float, Int, Optional, Section, Str
from pipeline.stage import atomic_path, read_json, stage_main, write_json

MODEL = "models/ncsn.pt"
SCHEDULE = "data/noise/schedule.json"
REFERENCE = "data/fid/ref_stats.npz"
CLASSIFIER = "models/classifier.pt"
METRICS = "reports/metrics/annealing.json"
FIGURE = "reports/figures/annealing.png"

SCHEMA = {
    **COMMON,
    "annealing": Section({
        "device": DEVICE,
        "use_ema": Bool(True),
        "n": Int(ge=2, le=10_000_000),
        "batch_size": Int(ge=1, le=1_000_000),
        "n_steps_each": Int(ge=1, le=100_000),
        "step_lr": Float(gt=0, le=10),
        "denoise": Bool(True),
        "fixed_sigma": Optional(Float(gt=0)),
        "n_show": Int(64, ge=1, le=1024),
    }),
}


# ------------------------------------------------------------------------------- shared helpers
def quality_metrics(x, seed: int, device, n: int | None = None, reference: str = REFERENCE,
                    classifier: str = CLASSIFIER, sw_projections: int = 128) -> dict[str, float]:
    """Sample quality against the cached reference of the ``fid_ref`` stage.

    Images (x in [0, 1], (N, C, H, W)): FID and KID through :func:`pipeline.fidelity.compute_fid_kid`
    for every extractor in the reference (``fid_<extractor>_n<n>``, ``kid_…``, ``kid_std_…``).
    Toy points: ``sliced_wasserstein_n<n>`` and ``mode_weight_error_n<n>`` as the evaluate stage computes them.
    """
    import torch

    from pipeline import fidelity as fd

    refs, extra = fd.load_references(reference)
    n = len(x) if n is None else int(n)
    if str(extra["kind"]) == "points":
        from stages.evaluate import evaluate_points

        return evaluate_points(x, extra, n, sw_projections, seed)
    images = fd.to_uint8(torch.as_tensor(x))
    device = torch.device(device)
    metrics: dict[str, float] = {}
    for name, ref in refs.items():
        weights = fd.prepare_extractor(name, extra, classifier, device)
        metrics.update(fd.compute_fid_kid(images, ref, name, n, cuda=device.type == "cuda", seed=seed,
                                          weights_path=weights))
    return metrics


def plot_grid(ax, x, n_show: int, title: str) -> None:
    """Images as one grid (or 2-D points as a scatter) on a matplotlib axis."""
    import numpy as np

    x = x.detach().float().cpu()
    if x.dim() == 4:
        from torchvision.utils import make_grid

        k = min(len(x), n_show)
        grid = make_grid(x[:k].clamp(0, 1), nrow=int(np.ceil(np.sqrt(k))), padding=1, pad_value=1.0)
        img = grid.permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if x.shape[1] == 1 else img, cmap="gray" if x.shape[1] == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([]), ax.set_yticks([])
    else:
        pts = x.numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)


def fid_name(metrics: dict) -> str | None:
    """The first FID metric name (``fid_<extractor>_n<n>``), or the toy's sliced Wasserstein."""
    for key in metrics:
        if key.startswith("fid_") or key.startswith("sliced_wasserstein_"):
            return key
    return None


def describe(metrics: dict) -> str:
    key = fid_name(metrics)
    return f"{key} = {metrics[key]:.3g}" if key else ""


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- stage
def sampler_configs(p: dict) -> dict[str, dict]:
    """sample.ncsn-shaped configs of the two samplers compared (same steps, step_lr, batch size)."""
    common = {"batch_size": p["batch_size"], "n_steps_each": p["n_steps_each"], "step_lr": p["step_lr"]}
    return {
        "langevin_fixed_sigma": {**common, "sampler": "langevin", "sigma": p["fixed_sigma"], "denoise": False},
        "annealed_langevin": {**common, "sampler": "annealed_langevin", "denoise": p["denoise"]},
    }


def run(params: dict, run, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from stages.sample import generate, load_trained

    p, seed = params["annealing"], params["seed"]
    from scoresde.training import resolve_device

    device = resolve_device(p["device"])
    schedule = read_json(SCHEDULE)
    model, info = load_trained(MODEL, device, use_ema=p["use_ema"])
    sigma_fixed = p["fixed_sigma"] or float(schedule["sigmas"][-1])

    results, samples = {}, {}
    for name, cfg in sampler_configs(p).items():
        g = torch.Generator(device=device).manual_seed(seed)  # the same starting images for both
        x, nfe, seconds = generate("ncsn", model, cfg, schedule, p["n"], device, g, info.get("centered", False))
        metrics = quality_metrics(x, seed, device)
        results[name] = {**metrics, "nfe": nfe, "seconds": seconds, "n": p["n"]}
        if name == "langevin_fixed_sigma":
            results[name]["sigma"] = sigma_fixed
        samples[name] = x
        run.log_metrics({f"{name}_{k}": v for k, v in results[name].items()})
        print(f"[annealing] {name}: {describe(metrics)} ({nfe} NFE, {seconds:.1f} s)", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    plot_grid(axes[0], samples["langevin_fixed_sigma"], p["n_show"],
              f"Langevin at fixed σ = {sigma_fixed:.3g} (no annealing)\n{describe(results['langevin_fixed_sigma'])}")
    plot_grid(axes[1], samples["annealed_langevin"], p["n_show"],
              f"annealed Langevin, σ = {schedule['sigmas'][0]:.3g} → {schedule['sigmas'][-1]:.3g}, "
              f"L = {len(schedule['sigmas'])}\n{describe(results['annealed_langevin'])}")
    fig.suptitle(f"NCSN samples, {p['n_steps_each'] * len(schedule['sigmas'])} Langevin steps each "
                 f"({'EMA' if p['use_ema'] else 'raw'} weights)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, FIGURE)

    write_json(METRICS, results)
    run.set_tags({"checkpoint": "ema" if p["use_ema"] else "raw", "fixed_sigma": sigma_fixed})
    run.log_artifact(METRICS, "metrics")
    run.log_artifact(FIGURE, "figures")


main = stage_main("annealing", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
