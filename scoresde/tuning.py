"""NCSNv2's rules for the noise schedule and the Langevin step size.

Song & Ermon (2020), "Improved Techniques for Training Score-Based Generative Models" (NCSNv2):

- Technique 1 (σ_1 = the largest pairwise distance of the training data) is
  :func:`scoresde.noise.sigma_begin_from_data`.
- Technique 2: the noise levels are a geometric progression σ_1 > … > σ_L whose common ratio
  γ = σ_{i-1}/σ_i satisfies Φ(√(2D)(γ-1) + 3γ) - Φ(√(2D)(γ-1) - 3γ) ≈ 0.5, D the data dimension
  (so that samples perturbed at σ_{i-1} overlap the high-density shell of N(x, σ_i² I) well enough):
  :func:`ncsnv2_gamma`, and :func:`ncsnv2_num_levels` for the L it implies between σ_1 and σ_L.
- Technique 4: with T Langevin steps per level (as large as the budget allows), choose ε so that their
  Eq. (4) (Proposition 3), the variance ratio s_T²/σ_i² after T steps started from the previous level, is
  as close to 1 as possible: :func:`ncsnv2_step_lr`.

Pure numpy / scipy / math; no torch.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import ndtr

__all__ = ["ncsnv2_gamma", "ncsnv2_num_levels", "ncsnv2_step_lr"]

_GAMMA_TARGET = 0.5  # technique 2: Φ(√(2D)(γ-1) + 3γ) - Φ(√(2D)(γ-1) - 3γ) = 0.5


def _gamma_equation(gamma: float, dim: int) -> float:
    """Technique 2's left-hand side minus 0.5 (Φ = ``scipy.special.ndtr``, the standard normal CDF)."""
    a = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return float(ndtr(a + 3.0 * gamma) - ndtr(a - 3.0 * gamma)) - _GAMMA_TARGET


def ncsnv2_gamma(dim: int) -> float:
    """The ratio γ = σ_{i-1}/σ_i > 1 of NCSNv2's geometric schedule (technique 2) for data of dimension ``dim``.

    γ is the root of Φ(√(2D)(γ-1) + 3γ) - Φ(√(2D)(γ-1) - 3γ) = 0.5 (Φ the standard normal CDF), found with
    ``scipy.optimize.brentq`` to ~1e-15. At γ = 1 the left side is Φ(3) - Φ(-3) ≈ 0.9973; it falls to 0 as
    γ grows only when √(2D) > 3, so the equation has no root for D ≤ 4 (there the left side stays ≥ 0.9973:
    the rule is a high-dimensional one) and such ``dim`` raises ValueError. γ decreases towards 1 as D grows
    (γ - 1 ≈ c/√(2D)); CIFAR-10 (D = 3072) gives γ ≈ 1.0398.
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1 (the data dimension), got {dim!r}")
    dim = int(dim)
    if 2 * dim <= 9:
        raise ValueError(f"dim = {dim}: NCSNv2 technique 2 has no root for dim <= 4 (√(2D) <= 3, so "
                         f"Φ(√(2D)(γ-1)+3γ) - Φ(√(2D)(γ-1)-3γ) stays above 0.5 for every γ > 1)")
    lo, hi = 1.0, 2.0
    while _gamma_equation(hi, dim) > 0:  # the left side falls to 0 for γ → ∞ once √(2D) > 3
        lo, hi = hi, 2.0 * hi
    return float(brentq(_gamma_equation, lo, hi, args=(dim,), xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500))


def ncsnv2_num_levels(dim: int, sigma_begin: float, sigma_end: float) -> int:
    """L, the number of geometric levels from σ_1 = ``sigma_begin`` down to σ_L = ``sigma_end`` with a ratio
    of at most technique 2's γ (:func:`ncsnv2_gamma` of ``dim``).

    L = ceil(log(σ_1/σ_L) / log γ) + 1. Rounding *up* is the choice that keeps the schedule's actual ratio
    (σ_1/σ_L)^{1/(L-1)} ≤ γ, i.e. neighbouring levels overlap at least as much as technique 2 asks; rounding
    down (or to nearest) could give a ratio above γ. A last check adds a level if floating-point rounding
    in the log ratio would leave the ratio above γ. CIFAR-10 (D = 3072, σ_1 = 50, σ_L = 0.01) gives L = 220
    (NCSNv2's config uses 232, i.e. a ratio ≈ 1.0376 against this γ ≈ 1.0398).
    """
    if not (isinstance(sigma_begin, (int, float, np.floating, np.integer)) and sigma_begin > 0
            and math.isfinite(sigma_begin)):
        raise ValueError(f"sigma_begin must be a finite number > 0, got {sigma_begin!r}")
    if not (isinstance(sigma_end, (int, float, np.floating, np.integer)) and sigma_end > 0):
        raise ValueError(f"sigma_end must be a number > 0, got {sigma_end!r}")
    if not sigma_end < sigma_begin:
        raise ValueError(f"sigma_end must be < sigma_begin = {sigma_begin!r}, got {sigma_end!r}")
    gamma = ncsnv2_gamma(dim)
    log_ratio = math.log(float(sigma_begin) / float(sigma_end))
    levels = math.ceil(log_ratio / math.log(gamma)) + 1
    while math.exp(log_ratio / (levels - 1)) > gamma:
        levels += 1
    return int(levels)


def _variance_ratio(u: float, gamma: float, n_steps: int) -> float:
    """NCSNv2 Eq. (4), written in u = ε/σ_L² ∈ (0, 1).

    Proposition 3: for a single data point at 0 (score -x/σ_i²), the update x ← x + α s + √(2α) z with
    α = ε σ_i²/σ_L², started from x ~ N(0, γ² σ_i² I) (the variance of the previous level), gives
    x_T ~ N(0, s_T² I) with

        s_T²/σ_i² = (1 - ε/σ_L²)^{2T} (γ² - 2ε/(σ_L² - σ_L²(1 - ε/σ_L²)²)) + 2ε/(σ_L² - σ_L²(1 - ε/σ_L²)²).

    With u = ε/σ_L² the fixed point 2ε/(σ_L² - σ_L²(1-u)²) = 2u/(1 - (1-u)²) = 2/(2 - u), so the ratio
    depends on ε only through u (the same at every level i, the last included where α = ε).
    """
    fixed = 2.0 / (2.0 - u)
    return (1.0 - u) ** (2 * n_steps) * (gamma * gamma - fixed) + fixed


def ncsnv2_step_lr(sigmas, n_steps_each: int) -> float:
    """Technique 4's step size for annealed Langevin over ``sigmas`` (descending) with T = ``n_steps_each``
    steps per level, returned as *this project's* ``step_lr``.

    Chooses ε ∈ (0, σ_L²) that brings NCSNv2's Eq. (4) (see :func:`_variance_ratio`) maximally close to 1,
    with γ = σ_{L-1}/σ_L taken from ``sigmas``: minimise |s_T²/σ_L² - 1| over u = ε/σ_L² ∈ (0, 1) (a log-spaced
    grid to find the basin, then ``scipy.optimize.minimize_scalar(method="bounded")`` around the best grid
    point; working in u keeps the optimiser's tolerance independent of σ_L's scale). Since s_T²/σ_i² is a
    weighted average of γ² ≥ 1 and 2/(2-u) ≥ 1, it never goes below 1: the optimum is the minimum of the
    ratio, not a root (for CIFAR-10's schedule the ratio stays ≈ 1.055 there). ε scales with σ_L² (u depends
    only on γ and T).

    Convention: NCSNv2's code (and Eq. (4)) writes the update as x + α s + √(2α) z, so its ``step_lr`` is
    ε_v2 = u σ_L². This project writes x + (α/2) s + √α z (the article's and NCSN's Algorithm 1,
    :func:`scoresde.sampling.annealed_langevin`), which is the same chain with α = 2 α_v2: the value returned
    is 2 ε_v2 = 2 u σ_L². NCSNv2's CIFAR-10 config (232 levels from 50 to 0.01, n_steps_each 5,
    step_lr 6.2e-6) corresponds to 1.24e-5 here; this function gives ≈ 1.237e-5 on that schedule.
    """
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, (int, np.integer)) or n_steps_each < 1:
        raise ValueError(f"n_steps_each must be an integer >= 1, got {n_steps_each!r}")
    s = np.asarray(sigmas, dtype=np.float64).reshape(-1)
    if s.size < 2:
        raise ValueError(f"sigmas must hold at least 2 levels (γ = σ_(L-1)/σ_L), got {s.size}")
    if not (np.all(np.isfinite(s)) and np.all(s > 0)):
        raise ValueError("sigmas must be finite and > 0")
    sigma_L = float(s[-1])
    gamma = float(s[-2]) / sigma_L
    if not gamma >= 1.0:
        raise ValueError(f"sigmas must be descending (σ_(L-1) >= σ_L), got σ_(L-1)/σ_L = {gamma:.6g}")
    T = int(n_steps_each)

    def objective(u: float) -> float:
        return abs(_variance_ratio(u, gamma, T) - 1.0)

    grid = np.logspace(-12, 0, 481)[:-1]  # u in [1e-12, 1), 40 points a decade, ascending
    values = np.array([objective(float(u)) for u in grid])
    k = int(np.argmin(values))
    lo = float(grid[k - 1]) if k > 0 else 0.0
    hi = float(grid[k + 1]) if k + 1 < grid.size else 1.0
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12 * max(hi, 1e-12)})
    u = float(res.x) if res.fun <= values[k] else float(grid[k])
    return 2.0 * u * sigma_L ** 2
