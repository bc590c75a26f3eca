"""Predictor-corrector sampling of the reverse SDE (Song et al., 2021, Algorithms 1-3), as score_sde's
``sampling.py``: predictors and correctors by name (:func:`get_predictor`, :func:`get_corrector`) and
:func:`pc_sampler`. Also the helpers every sampler shares (NFE counting, noise, progress).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import sde as sde_lib
from .sde import bcast

# ----------------------------------------------------------------------------------------- helpers
def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _device(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _progress(iterable, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


class _CountingScore:
    """Wraps a score function and counts its calls (the number of function evaluations, NFE)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.nfe = 0

    def __call__(self, *args):
        self.nfe += 1
        return self.fn(*args)


# --------------------------------------------------------------------------------------- predictors
class Predictor:
    """One step of a numerical solver of the reverse SDE from t to t - 1/N: ``update_fn(x, t) -> (x, x_mean)``."""

    def __init__(self, sde, score_fn, probability_flow: bool = False, generator: torch.Generator | None = None):
        self.sde = sde
        self.score_fn = score_fn
        self.rsde = sde.reverse(score_fn, probability_flow)
        self.generator = generator

    def update_fn(self, x: torch.Tensor, t: torch.Tensor):
        raise NotImplementedError


class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama on the reverse SDE: x <- x - [f - g^2 s] dt + g sqrt(dt) z, dt = T/N."""

    def update_fn(self, x, t):
        dt = -self.sde.T / self.sde.N
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        return x_mean + bcast(diffusion, x) * math.sqrt(-dt) * _randn_like(x, self.generator), x_mean


class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion (Song et al., 2021, Eq. 47): x <- x - f_i + G_i^2 s + G_i z from the forward discretisation."""

    def update_fn(self, x, t):
        f, G = self.rsde.discretize(x, t)
        x_mean = x - f
        return x_mean + bcast(G, x) * _randn_like(x, self.generator), x_mean


class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling of the discrete chains (Song et al., 2021, App. F).

    VE (SMLD): x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s, noise std sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2).
    VP (DDPM, Ho et al. 2020 Eq. 11 in score form): x_mean = (x + beta_i s) / sqrt(1 - beta_i), noise std sqrt(beta_i).
    sub-VP has no discrete chain, so it is refused.
    """

    def __init__(self, sde, score_fn, probability_flow: bool = False, generator=None):
        super().__init__(sde, score_fn, probability_flow, generator)
        if not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)):
            raise ValueError("ancestral sampling is defined for the VE (SMLD) and VP (DDPM) chains only")
        if probability_flow:
            raise ValueError("ancestral sampling has no probability-flow variant")

    def update_fn(self, x, t):
        sde = self.sde
        i = sde._timestep(t)
        if isinstance(sde, sde_lib.VESDE):
            sigmas = sde.discrete_sigmas.to(device=t.device, dtype=t.dtype)
            sigma = sigmas[i]
            adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
            x_mean = x + bcast(sigma**2 - adjacent**2, x) * self.score_fn(x, t)
            std = torch.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        else:
            beta = sde.discrete_betas.to(device=t.device, dtype=t.dtype)[i]
            x_mean = (x + bcast(beta, x) * self.score_fn(x, t)) / bcast(torch.sqrt(1.0 - beta), x)
            std = torch.sqrt(beta)
        return x_mean + bcast(std, x) * _randn_like(x, self.generator), x_mean


class NonePredictor(Predictor):
    """No predictor (corrector-only sampling)."""

    def update_fn(self, x, t):
        return x, x


# --------------------------------------------------------------------------------------- correctors
class Corrector:
    """MCMC steps targeting p_t at fixed t: ``update_fn(x, t) -> (x, x_mean)``."""

    def __init__(self, sde, score_fn, snr: float, n_steps: int, generator: torch.Generator | None = None):
        self.sde = sde
        self.score_fn = score_fn
        self.snr = float(snr)
        self.n_steps = int(n_steps)
        self.generator = generator

    def _alpha(self, t):
        # score_sde rescales the VP step by alpha_i = 1 - beta_i of the DDPM chain.
        if isinstance(self.sde, (sde_lib.VPSDE, sde_lib.SubVPSDE)):
            return self.sde.alphas.to(device=t.device, dtype=t.dtype)[self.sde._timestep(t)]
        return torch.ones_like(t)

    def update_fn(self, x, t):
        raise NotImplementedError


class LangevinCorrector(Corrector):
    """Langevin corrector with a signal-to-noise step size (Song et al., 2021, Alg. 4-5).

    eps = 2 alpha (r ||z|| / ||s||)^2 with r = ``snr`` and norms averaged over the batch;
    x <- x + eps s(x, t) + sqrt(2 eps) z.
    """

    def update_fn(self, x, t):
        alpha = self._alpha(t)
        x_mean = x
        for _ in range(self.n_steps):
            grad = self.score_fn(x, t)
            noise = _randn_like(x, self.generator)
            grad_norm = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.linalg.vector_norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
            step = (self.snr * noise_norm / grad_norm) ** 2 * 2 * alpha
            x_mean = x + bcast(step, x) * grad
            x = x_mean + bcast(torch.sqrt(2 * step), x) * noise
        return x, x_mean


class AnnealedLangevinCorrector(Corrector):
    """NCSN's annealed Langevin step inside PC (score_sde's ``AnnealedLangevinDynamics``).

    eps = 2 alpha (r std(t))^2, x <- x + eps s(x, t) + sqrt(2 eps) z; with r = snr this is
    :func:`annealed_langevin`'s alpha_i / 2 = step_lr sigma_i^2 / sigma_L^2 / 2 rule written per t.
    """

    def update_fn(self, x, t):
        alpha = self._alpha(t)
        std = self.sde.marginal_prob(x, t)[1]
        x_mean = x
        for _ in range(self.n_steps):
            grad = self.score_fn(x, t)
            noise = _randn_like(x, self.generator)
            step = (self.snr * std) ** 2 * 2 * alpha
            x_mean = x + bcast(step, x) * grad
            x = x_mean + bcast(torch.sqrt(2 * step), x) * noise
        return x, x_mean


class NoneCorrector(Corrector):
    """No corrector (predictor-only sampling)."""

    def update_fn(self, x, t):
        return x, x


_PREDICTORS = {
    "euler_maruyama": EulerMaruyamaPredictor,
    "reverse_diffusion": ReverseDiffusionPredictor,
    "ancestral": AncestralSamplingPredictor,
    "none": NonePredictor,
}
_CORRECTORS = {
    "langevin": LangevinCorrector,
    "ald": AnnealedLangevinCorrector,
    "none": NoneCorrector,
}


def get_predictor(name: str) -> type[Predictor]:
    """Predictor class by name: euler_maruyama, reverse_diffusion, ancestral, none."""
    key = str(name).lower()
    if key not in _PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose from {sorted(_PREDICTORS)}")
    return _PREDICTORS[key]


def get_corrector(name: str) -> type[Corrector]:
    """Corrector class by name: langevin, ald, none."""
    key = str(name).lower()
    if key not in _CORRECTORS:
        raise ValueError(f"unknown corrector {name!r}; choose from {sorted(_CORRECTORS)}")
    return _CORRECTORS[key]


# ------------------------------------------------------------------------------------- PC sampling
@torch.inference_mode()
def pc_sampler(
    sde,
    score_fn,
    shape,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    denoise: bool = True,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    *,
    probability_flow: bool = False,
    device=None,
    dtype=None,
    x_init: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampler (Song et al., 2021, Algorithm 1), as score_sde's ``get_pc_sampler``.

    Start from x ~ p_T (``sde.prior_sampling`` or ``x_init``), then for the N = ``sde.N`` times
    t_i = linspace(T, eps, N): ``n_corrector_steps`` corrector steps, then one predictor step. With
    ``denoise`` the last predictor step's noise-free mean is returned (no noise is added at t = eps).
    Returns ``(x, nfe)``, nfe = number of ``score_fn`` calls (N (1 + n_corrector_steps) for PC).
    """
    counted = _CountingScore(score_fn)
    P = get_predictor(predictor) if isinstance(predictor, str) else predictor
    C = get_corrector(corrector) if isinstance(corrector, str) else corrector
    pred = P(sde, counted, probability_flow, generator)
    corr = C(sde, counted, snr, n_corrector_steps, generator)
    dev = _device(generator, device)
    if x_init is None:
        x = sde.prior_sampling(tuple(shape), generator=generator, device=dev, dtype=dtype)
    else:
        x = x_init.clone()
    timesteps = torch.linspace(sde.T, eps, sde.N, device=x.device, dtype=x.dtype)
    x_mean = x
    for i in _progress(range(sde.N), progress, desc="pc"):
        vec_t = timesteps[i].expand(x.shape[0])
        x, x_mean = corr.update_fn(x, vec_t)
        x, x_mean = pred.update_fn(x, vec_t)
    return (x_mean if denoise else x), counted.nfe
