"""Figures the stages write: sample grids, side-by-side sampler panels, the forward-process strip.

Everything is drawn with matplotlib's Agg backend (no display) and written atomically.
"""
from __future__ import annotations

import numpy as np

from pipeline.io import atomic_path, save_figure
from pipeline.schemas import MODEL_KINDS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(ax, x, n_show: int, title: str) -> None:
    """Images as one grid (or 2-D points as a scatter) on a matplotlib axis."""
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


def panels(samples: dict, titles: dict, n_show: int, suptitle: str, path: str, width: float = 3.6,
           height: float = 4.2) -> None:
    """One grid per entry of ``samples`` side by side, titled from ``titles``."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(width * len(samples), height), squeeze=False)
    for ax, (name, x) in zip(axes[0], samples.items()):
        plot_grid(ax, x, n_show, titles[name])
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, path)


def save_sample_grid(x, path: str, title: str = "") -> None:
    """Up to 100 images as a PNG grid (torchvision), or 2-D points as a scatter plot."""
    with atomic_path(path) as tmp:
        if x.dim() == 4:
            from torchvision.utils import save_image

            k = min(len(x), 100)
            save_image(x[:k].float(), tmp, nrow=int(np.ceil(np.sqrt(k))), padding=1, format="png")
            return
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(4, 4))
        pts = x.numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title, fontsize=9)
        fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)


def plot_forward(schedule: dict, rows: list[dict], path: str, n_times: int) -> None:
    """The forward (noising) process: scatter panels per NCSN level for points; for images a strip of two
    examples per process (NCSN levels σ_i, VE / VP / subVP marginals at ``n_times`` times)."""
    plt = pyplot()
    shape = schedule["data_shape"]
    processes = list(MODEL_KINDS)
    if len(shape) == 1:
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
        n_ex = min(2, max(r["example"] for r in rows) + 1)
        rows = [r for r in rows if r["example"] < n_ex]
        ncols = max(len(schedule["sigmas"]), n_times)
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
    save_figure(fig, path, dpi=80)
