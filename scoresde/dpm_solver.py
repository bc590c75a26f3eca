"""DPM-Solver++(2M): the multistep second-order solver of the probability-flow ODE in data prediction
(Lu, Zhou, Bao, Chen, Li & Zhu, 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", Algorithm 2), for any of the project's SDEs (VE, VP, sub-VP).

Every SDE of Song et al. (2021) has a Gaussian perturbation kernel x_t = α_t x_0 + σ_t ε
(α_t = ``sde.mean_coeff``, σ_t the std of ``sde.marginal_prob``). With the half-log-SNR λ_t = log(α_t / σ_t)
and the data prediction (Tweedie's formula, from the t-conditioned score)

    x_θ(x, t) = (x + σ_t² s_θ(x, t)) / α_t,

the probability-flow ODE (Song et al., 2021, Eq. 13) has the exact solution (DPM-Solver++ Eq. 8)

    x_t = (σ_t / σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ(x_λ, λ) dλ,

whose linear part is integrated exactly and whose integral is approximated from x_θ at the last two
time steps (a linear multistep rule in λ). One score evaluation per step.
"""

from __future__ import annotations

import math

import torch

from .pc import _CountingScore, _device, _progress

__all__ = ["dpm_solver_pp_2m", "dpm_solver_timesteps", "SKIP_TYPES"]

SKIP_TYPES = ("logSNR", "time_uniform")


def _alpha_sigma(sde, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α_t and σ_t of the SDE's perturbation kernel, shape of ``t`` (1-D)."""
    one = torch.ones(t.shape[0], 1, dtype=t.dtype, device=t.device)
    mean, std = sde.marginal_prob(one, t)
    return mean[:, 0], std


def dpm_solver_timesteps(sde, steps: int, eps: float = 1e-3, skip_type: str = "logSNR") -> torch.Tensor:
    """The M + 1 = ``steps`` + 1 times t_0 = T > t_1 > … > t_M = ``eps`` (float64).

    ``"logSNR"``: uniform in λ_t = log(α_t / σ_t), the spacing DPM-Solver uses for low-resolution data (Lu et
    al., 2022a, Sec. 3.3 and App. D; the default here: the project's images are 8×8 to 64×64); ``"time_uniform"``:
    uniform in t (their recommendation for high resolutions). λ → t inverts through ``sde.noise_level_to_t``,
    since σ_t / α_t = e^{−λ} is the EDM noise level of every SDE.
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ends = torch.tensor([sde.T, eps], dtype=torch.float64)
    if skip_type == "time_uniform":
        return torch.linspace(sde.T, eps, int(steps) + 1, dtype=torch.float64)
    alpha, sigma = _alpha_sigma(sde, ends)
    lam = torch.log(alpha) - torch.log(sigma)
    lams = torch.linspace(float(lam[0]), float(lam[1]), int(steps) + 1, dtype=torch.float64)
    ts = sde.noise_level_to_t(torch.exp(-lams))
    ts[0], ts[-1] = sde.T, eps  # the inverse is exact up to rounding: pin the ends
    return ts


@torch.inference_mode()
def dpm_solver_pp_2m(
    sde,
    score_fn,
    shape,
    *,
    steps: int = 20,
    eps: float = 1e-3,
    skip_type: str = "logSNR",
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
    device=None,
    dtype=None,
    x_init: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2) on the probability-flow ODE of ``sde``, from T to ``eps``.

    ``score_fn(x, t)`` is the t-conditioned score (t of shape (batch,)). Starting from x̃_0 ~ p_T
    (``sde.prior_sampling``, or ``x_init``), with h_i = λ_{t_i} − λ_{t_{i−1}} and x_θ the data prediction:

    - step 1 (first order, DPM-Solver++1 = DDIM): x̃_1 = (σ_1 / σ_0) x̃_0 − α_1 (e^{−h_1} − 1) x_θ(x̃_0, t_0);
    - step i ≥ 2: r_i = h_{i−1} / h_i, D_i = (1 + 1/(2 r_i)) x_θ(x̃_{i−1}, t_{i−1}) − 1/(2 r_i) x_θ(x̃_{i−2}, t_{i−2}),
      x̃_i = (σ_i / σ_{i−1}) x̃_{i−1} − α_i (e^{−h_i} − 1) D_i;

    with ``lower_order_final`` and fewer than 10 steps the last step is first order, as in the authors' code
    (it steadies very few steps). Times from :func:`dpm_solver_timesteps` (``skip_type``). Each step costs
    one score evaluation (x_θ at t_M is never needed): nfe = ``steps``. No final denoising step: x̃_M is
    the sample at t = ``eps``, like :func:`scoresde.sampling.ode_sampler`. Returns ``(x, nfe)``.
    """
    counted = _CountingScore(score_fn)
    M = int(steps)
    ts = dpm_solver_timesteps(sde, M, eps, skip_type)
    alpha, sigma = _alpha_sigma(sde, ts)  # float64 schedule: λ differences are small for many steps
    lam = torch.log(alpha) - torch.log(sigma)
    dev = _device(generator, device)
    if x_init is None:
        x = sde.prior_sampling(tuple(shape), generator=generator, device=dev, dtype=dtype)
    else:
        x = x_init.clone()

    def data_prediction(x, i):
        # x_θ(x, t_i) = (x + σ_i² s(x, t_i)) / α_i: Tweedie's formula for x_t = α x_0 + σ ε
        vec_t = torch.full((x.shape[0],), float(ts[i]), device=x.device, dtype=x.dtype)
        return (x + float(sigma[i]) ** 2 * counted(x, vec_t)) / float(alpha[i])

    prev = None  # x_θ at t_{i-2}
    cur = data_prediction(x, 0)  # x_θ at t_{i-1}
    for i in _progress(range(1, M + 1), progress, desc="dpm-solver++"):
        h = float(lam[i] - lam[i - 1])
        first_order = prev is None or (lower_order_final and M < 10 and i == M)
        if first_order:
            D = cur
        else:
            r = float(lam[i - 1] - lam[i - 2]) / h
            D = (1.0 + 0.5 / r) * cur - (0.5 / r) * prev
        # −α_i (e^{−h} − 1) written with expm1: exact for the small h of many steps
        x = float(sigma[i] / sigma[i - 1]) * x - float(alpha[i]) * math.expm1(-h) * D
        if i < M:
            prev, cur = cur, data_prediction(x, i)
    return x, counted.nfe
