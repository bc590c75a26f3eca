"""Noise levels for NCSN / annealed Langevin dynamics.

- Song & Ermon (2019), Sec. 4.2: a geometric sequence sigma_1 > ... > sigma_L with a constant ratio.
- Song & Ermon (2020), "Improved Techniques for Training Score-Based Generative Models" (NCSNv2),
  Technique 1: choose sigma_1 as large as the maximum pairwise Euclidean distance between training points.
"""

from __future__ import annotations

import math

import torch

__all__ = ["geometric_sigmas", "sigma_begin_from_data"]


def geometric_sigmas(sigma_begin: float, sigma_end: float, num_levels: int) -> torch.Tensor:
    """sigma_i = exp(linspace(log sigma_begin, log sigma_end, L)), a descending geometric sequence.

    Computed and returned in float64 (so sigma_1 / sigma_2 = ... = sigma_{L-1} / sigma_L to ~1e-15 and the
    end points are exact to rounding); cast with ``.float()`` / ``.to(x)`` where a network needs float32.
    """
    if num_levels < 1:
        raise ValueError("num_levels must be >= 1")
    if not (sigma_begin > 0 and sigma_end > 0):
        raise ValueError("noise levels must be positive")
    if sigma_begin < sigma_end:
        raise ValueError("sigma_begin must be >= sigma_end (levels are descending)")
    if num_levels == 1:
        return torch.tensor([float(sigma_begin)], dtype=torch.float64)
    s = torch.exp(torch.linspace(math.log(sigma_begin), math.log(sigma_end), num_levels, dtype=torch.float64))
    # Pin the ends to the requested values exactly (exp(log(a)) can be off by one ulp).
    s[0], s[-1] = float(sigma_begin), float(sigma_end)
    return s


@torch.no_grad()
def sigma_begin_from_data(x: torch.Tensor, chunk_elements: int = 1 << 24) -> float:
    """Largest pairwise Euclidean distance max_{i,j} ||x_i - x_j|| (NCSNv2, Technique 1).

    The N x N distance matrix is never held: rows are compared block by block against the rows after
    them (upper triangle only), each block of ``torch.cdist`` at most ``chunk_elements`` entries
    (64 MiB in float32 by default), so 60k MNIST images need ~100 MB, not 14 GB. The winning pair is
    re-measured in float64 because cdist's matrix-multiply path loses digits for large norms.
    """
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    if n < 2:
        return 0.0
    xf = x.float()
    rows = max(1, min(n, chunk_elements // n))
    best, best_pair = -1.0, (0, 0)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d = torch.cdist(xf[start:stop], xf[start:])  # block of the upper triangle (and its diagonal)
        val, flat = d.reshape(-1).max(dim=0)
        if val.item() > best:
            r, c = divmod(int(flat), d.shape[1])
            best, best_pair = val.item(), (start + r, start + c)
    i, j = best_pair
    return float(torch.linalg.vector_norm(x[i].double() - x[j].double()))
