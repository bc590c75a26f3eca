"""Sample-quality metrics.

- :func:`sliced_wasserstein`  sliced 1-Wasserstein distance (Rabin et al., 2011; Bonneel et al., 2015)
- :func:`mode_weight_error`   max_k |fraction of samples nearest mu_k - w_k| for a Gaussian mixture
- :func:`frechet_distance`    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) (Heusel et al., 2017, FID),
                              computed as pytorch-fid does
- :func:`feature_statistics`  float64 mean and covariance of a feature matrix
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["sliced_wasserstein", "mode_weight_error", "frechet_distance", "feature_statistics"]


def _w1_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 between empirical measures per row: a (P, n), b (P, m), both sorted along dim 1.

    W1 = int_0^1 |F_a^{-1}(u) - F_b^{-1}(u)| du. Both quantile functions are step functions that change
    only at multiples of 1/n and 1/m, so the integral is a finite sum over the merged break points.
    """
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return (a - b).abs().mean(dim=1)
    dev = a.device
    qa = torch.arange(1, n + 1, dtype=torch.float64, device=dev) / n
    qb = torch.arange(1, m + 1, dtype=torch.float64, device=dev) / m
    u = torch.unique(torch.cat([qa, qb]))  # sorted break points, last is 1
    widths = torch.diff(u, prepend=torch.zeros(1, dtype=torch.float64, device=dev))
    mid = u - widths / 2  # a point inside each interval avoids ties at the break points
    ia = torch.searchsorted(qa, mid).clamp(max=n - 1)  # index k with k/n < u <= (k+1)/n
    ib = torch.searchsorted(qb, mid).clamp(max=m - 1)
    return ((a[:, ia] - b[:, ib]).abs() * widths).sum(dim=1)


@torch.no_grad()
def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    n_projections: int = 128,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced 1-Wasserstein distance: the mean over random unit directions theta of W1(theta^T x, theta^T y).

    Each 1-D W1 is exact for the two empirical measures (sorted projections; when the sample sizes differ
    the quantile functions are compared on the merged grid of break points). Directions are uniform on the
    sphere (normalised Gaussians drawn with ``generator``, on CPU). Points are flattened to (n, D).
    """
    xf = torch.as_tensor(x).reshape(len(x), -1).double().cpu()
    yf = torch.as_tensor(y).reshape(len(y), -1).double().cpu()
    if xf.shape[1] != yf.shape[1]:
        raise ValueError("x and y must have the same dimension")
    gdev = generator.device if generator is not None else torch.device("cpu")
    theta = torch.randn(n_projections, xf.shape[1], generator=generator, dtype=torch.float64, device=gdev).cpu()
    theta = theta / torch.linalg.vector_norm(theta, dim=1, keepdim=True)
    px = torch.sort(theta @ xf.T, dim=1).values  # (P, n)
    py = torch.sort(theta @ yf.T, dim=1).values  # (P, m)
    return float(_w1_sorted(px, py).mean())


def mode_weight_error(x: torch.Tensor, mixture) -> float:
    """max_k | mixture.mode_weights(x)_k - w_k |: how far nearest-mode fractions are from the mixture weights."""
    return float((mixture.mode_weights(x) - mixture.weights.cpu()).abs().max())


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (n, D), in float64 (np.cov with rowvar=False, ddof=1)."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    f = f.reshape(f.shape[0], -1).astype(np.float64)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula, Heusel et al., 2017).

    d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}), with scipy's ``sqrtm``.
    As in pytorch-fid: a singular product gets ``eps`` added to both diagonals, and a complex square root
    from numerical error is accepted only if the imaginary part of its diagonal is < 1e-3.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64)), np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("mean vectors / covariances have different shapes")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
