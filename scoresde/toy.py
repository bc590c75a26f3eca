"""Isotropic Gaussian mixtures: exact densities, exact scores, exact noisy/SDE marginals.

The article's Fig. 1 density (Song & Ermon, 2019, Sec. 3.2.2) is
``GaussianMixture([0.8, 0.2], [(5, 5), (-5, -5)], 1.0)``. Because convolving an isotropic mixture with
Gaussian noise, or pushing it through a linear SDE, gives again an isotropic mixture, every score a
sampler needs is available in closed form; this is what the sampler tests and benchmarks run on.

Mixture: p(x) = sum_k w_k N(x; mu_k, std^2 I).
Perturbed: p_sigma = p * N(0, sigma^2 I) = sum_k w_k N(mu_k, (std^2 + sigma^2) I).
SDE marginal (Song et al., 2021, App. B): x(t) = s(t) x(0) + std(t) z, so
p_t = sum_k w_k N(s(t) mu_k, (s(t)^2 std^2 + std(t)^2) I).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["GaussianMixture"]


def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            # A constant (batch,) vector as samplers pass it is fine; anything else needs the
            # per-sample score functions below.
            if not torch.all(v == v.reshape(-1)[0]):
                raise ValueError("expected a scalar (or a constant vector); use sde_score/ncsn_score for per-sample values")
        return float(v.reshape(-1)[0])
    return float(v)


class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, std^2 I) with exact log density and score.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, D) component means.
        std: the common isotropic standard deviation.
    """

    def __init__(self, weights: Sequence[float] | torch.Tensor, means, std: float = 1.0):
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if torch.any(w < 0) or w.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        self.weights = (w / w.sum()).float()
        self.means = torch.as_tensor(means, dtype=torch.float32).reshape(w.shape[0], -1)
        self.std = float(std)
        if self.std <= 0:
            raise ValueError("std must be positive")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        def g(v):  # float32 parameters printed as they were written (0.8, not 0.800000011920929)
            return [g(u) for u in v] if isinstance(v, list) else float(f"{v:.6g}")

        return f"GaussianMixture(weights={g(self.weights.tolist())}, means={g(self.means.tolist())}, std={self.std:g})"

    # ----------------------------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n i.i.d. points (n, D); with ``return_labels`` also the component index of each (n,)."""
        device = generator.device if generator is not None else torch.device("cpu")
        labels = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, device=device)
        x = self.means.to(device)[labels] + self.std * z
        return (x, labels) if return_labels else x

    # ------------------------------------------------------------------ density and score (core)
    def _logits(self, x: torch.Tensor, scale: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; scale mu_k, var I) per sample and component, (B, K).

        ``scale`` and ``var`` are per sample (B,), which is what per-sample t or sigma needs.
        """
        mu = self.means.to(x)
        w = self.weights.to(x)
        d = x.shape[1]
        diff = x[:, None, :] - scale[:, None, None] * mu[None]  # (B, K, D)
        sq = diff.pow(2).sum(-1)
        return torch.log(w)[None] - 0.5 * sq / var[:, None] - 0.5 * d * torch.log(2 * math.pi * var)[:, None]

    def _score(self, x: torch.Tensor, scale: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # grad log p = sum_k r_k(x) (scale mu_k - x) / var with responsibilities r = softmax(logits).
        r = torch.softmax(self._logits(x, scale, var), dim=1)  # (B, K)
        mean_post = r @ self.means.to(x)  # (B, D)
        return (scale[:, None] * mean_post - x) / var[:, None]

    def _flat(self, x):
        x = torch.as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected points of shape (n, {self.dim}), got {tuple(x.shape)}")
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per point (n,), by logsumexp over components."""
        x = self._flat(x)
        one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return torch.logsumexp(self._logits(x, one, one * self.std**2), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Exact data score grad_x log p(x), (n, D)."""
        x = self._flat(x)
        one = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
        return self._score(x, one, one * self.std**2)

    # ----------------------------------------------------------------------- derived densities
    def perturb(self, sigma: float) -> "GaussianMixture":
        """p_sigma = p * N(0, sigma^2 I): the same mixture with std sqrt(std^2 + sigma^2)."""
        s = _scalar(sigma)
        return GaussianMixture(self.weights, self.means, math.sqrt(self.std**2 + s**2))

    def marginal(self, sde, t) -> "GaussianMixture":
        """Exact p_t of ``sde`` started from this mixture, for a scalar t (float or constant tensor).

        Means scale by the SDE's mean coefficient s(t) and std^2 = s(t)^2 std^2 + std(t)^2.
        """
        tt = torch.tensor([_scalar(t)], dtype=torch.float64)
        mean, std_t = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), tt)
        s = float(mean.reshape(-1)[0])
        sd = float(std_t.reshape(-1)[0])
        return GaussianMixture(self.weights, self.means * s, math.sqrt(s**2 * self.std**2 + sd**2))

    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of points whose nearest component mean is mu_k, (K,)."""
        x = self._flat(x)
        nearest = torch.cdist(x.float(), self.means.to(x.device)).argmin(dim=1)
        return torch.bincount(nearest, minlength=self.means.shape[0]).float().cpu() / x.shape[0]

    # ------------------------------------------------------------ exact score functions for samplers
    def ncsn_score(self):
        """Exact noise-conditional score ``score_fn(x, sigma)`` = grad log p_sigma(x), sigma of shape (batch,)."""

        def score_fn(x, sigma):
            sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
            return self._score(x, torch.ones_like(sigma), self.std**2 + sigma**2)

        return score_fn

    def sde_score(self, sde):
        """Exact time-dependent score ``score_fn(x, t)`` = grad log p_t(x) under ``sde``, t of shape (batch,)."""

        def score_fn(x, t):
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            mean, std_t = sde.marginal_prob(torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device), t)
            s = mean[:, 0]
            return self._score(x, s, s**2 * self.std**2 + std_t**2)

        return score_fn
