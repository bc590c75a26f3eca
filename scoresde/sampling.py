"""Samplers driven by a score function.

- :func:`langevin`            unadjusted Langevin dynamics (Welling & Teh, 2011; article Eq. "Langevin")
- :func:`annealed_langevin`   NCSN's annealed Langevin dynamics (Song & Ermon, 2019, Alg. 1)
- :func:`pc_sampler`          predictor-corrector sampling of the reverse SDE (Song et al., 2021, Alg. 1-3)
- :func:`ode_sampler`         probability-flow ODE (Song et al., 2021, Eq. 13) with scipy's adaptive RK45
- :func:`heun_sampler`        EDM's deterministic 2nd-order sampler (Karras et al., 2022, Alg. 1, no churn)

Score-function conventions: ``score_fn(x)`` (data score) for :func:`langevin`; ``score_fn(x, sigma)`` with
sigma of shape (batch,) for :func:`annealed_langevin`; ``score_fn(x, t)`` with t of shape (batch,) for the
SDE samplers. Everything is vectorised over the batch and every random number comes from ``generator``,
which must live on the sampling device (samples are created on ``generator.device`` unless ``device`` is
given). :func:`annealed_langevin` and the SDE samplers (network score functions) run under
``torch.inference_mode()`` (no autograd bookkeeping, no version counters; the returned tensors are
inference tensors: use them out of place); :func:`langevin` (often given an analytic or autograd-based
data score) runs under ``torch.no_grad()``, and a score function that needs autograd must enable it itself.
The SDE samplers return ``(x, nfe)`` where nfe counts calls of ``score_fn`` (one call = one batched evaluation).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import sde as sde_lib
from .sde import bcast

__all__ = [
    "langevin",
    "annealed_langevin",
    "pc_sampler",
    "ode_sampler",
    "heun_sampler",
    "edm_sigmas",
    "Predictor",
    "EulerMaruyamaPredictor",
    "ReverseDiffusionPredictor",
    "AncestralSamplingPredictor",
    "NonePredictor",
    "Corrector",
    "LangevinCorrector",
    "AnnealedLangevinCorrector",
    "NoneCorrector",
    "get_predictor",
    "get_corrector",
    "get_sampler",
]


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


# ------------------------------------------------------------------------------ Langevin dynamics
@torch.no_grad()
def langevin(
    score_fn,
    x: torch.Tensor,
    step_size: float,
    n_steps: int,
    generator: torch.Generator | None = None,
    *,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Unadjusted Langevin dynamics x <- x + (eps/2) s(x) + sqrt(eps) z, z ~ N(0, I), eps = ``step_size``.

    ``score_fn(x)`` is the data score. Runs ``n_steps`` steps from ``x`` (n_steps score evaluations) and
    returns the final state; ``callback(step, x)`` (optional) sees every state, for figures. The article's
    Fig. 1 runs this with eps = 0.1 and 1000 steps from Uniform[-8, 8]^2 and shows it mis-weights modes.
    """
    eps = float(step_size)
    x = x.clone()
    for k in _progress(range(n_steps), progress, desc="langevin"):
        x = x + 0.5 * eps * score_fn(x) + math.sqrt(eps) * _randn_like(x, generator)
        if callback is not None:
            callback(k, x)
    return x


@torch.inference_mode()
def annealed_langevin(
    score_fn,
    x: torch.Tensor,
    sigmas,
    n_steps_each: int = 100,
    *,
    step_lr: float,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
    callback: Callable | None = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon, 2019, Algorithm 1).

    For each level i = 1..L (``sigmas`` descending), with alpha_i = eps sigma_i^2 / sigma_L^2 and
    eps = ``step_lr``, run ``n_steps_each`` steps of

        x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z,    z ~ N(0, I),

    which is the article's (and the paper's) update. NCSN's released code writes the same update as
    x + a s + sqrt(2 a) z with a = step_lr_code sigma_i^2 / sigma_L^2, i.e. a = alpha / 2: its
    ``step_lr`` is eps / 2, so NCSN's step_lr = 2e-5 is ``step_lr=4e-5`` here (NCSN's toy experiment
    uses the /2 form directly with 0.1, which is ``step_lr=0.1`` here).

    ``score_fn(x, sigma)`` gets sigma as a (batch,) tensor. With ``denoise`` a final Tweedie step
    x <- x + sigma_L^2 s(x, sigma_L) (Jolicoeur-Martineau et al., 2020; NCSNv2) returns E[x_0 | x] and
    costs one more score evaluation: L * n_steps_each (+1) evaluations in all. ``callback(i, k, x)`` sees
    every state.
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    eps = float(step_lr)
    sigma_L = float(sig[-1])
    x = x.clone()
    steps = [(i, k) for i in range(sig.shape[0]) for k in range(n_steps_each)]
    for i, k in _progress(steps, progress, desc="annealed langevin"):
        sigma_i = float(sig[i])
        alpha = eps * (sigma_i / sigma_L) ** 2
        level = torch.full((x.shape[0],), sigma_i, dtype=x.dtype, device=x.device)
        x = x + 0.5 * alpha * score_fn(x, level) + math.sqrt(alpha) * _randn_like(x, generator)
        if callback is not None:
            callback(i, k, x)
    if denoise:
        level = torch.full((x.shape[0],), sigma_L, dtype=x.dtype, device=x.device)
        x = x + sigma_L**2 * score_fn(x, level)
    return x


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


# ------------------------------------------------------------------------------- probability flow
@torch.inference_mode()
def ode_sampler(
    sde,
    score_fn,
    shape,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    *,
    denoise: bool = False,
    device=None,
    dtype=None,
    x_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al., 2021, Eq. 13)
    from T to ``eps`` with ``scipy.integrate.solve_ivp`` (adaptive ``method``, default RK45, ``rtol``/``atol``).

    The whole batch is one flattened state, as in score_sde. The only randomness is x(T) ~ p_T. With
    ``denoise`` one noise-free reverse-diffusion step at t = eps follows (one more evaluation).
    Returns ``(x, nfe)``; nfe = ``solution.nfev`` (+1 with denoise).
    """
    from scipy import integrate

    dev = _device(generator, device)
    if x_init is None:
        x = sde.prior_sampling(tuple(shape), generator=generator, device=dev, dtype=dtype)
    else:
        x = x_init.clone()
    shape, xdtype = x.shape, x.dtype
    rsde = sde.reverse(score_fn, probability_flow=True)

    def ode_func(t, y):
        xt = torch.from_numpy(y).reshape(shape).to(device=x.device, dtype=xdtype)
        vec_t = torch.full((shape[0],), t, device=x.device, dtype=xdtype)
        drift = rsde.sde(xt, vec_t)[0]
        return drift.reshape(-1).double().cpu().numpy()

    y0 = x.reshape(-1).double().cpu().numpy()
    sol = integrate.solve_ivp(ode_func, (sde.T, eps), y0, rtol=rtol, atol=atol, method=method)
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE failed: {sol.message}")
    nfe = int(sol.nfev)
    x = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device=x.device, dtype=xdtype)
    if denoise:
        vec_eps = torch.full((shape[0],), eps, device=x.device, dtype=xdtype)
        _, x = ReverseDiffusionPredictor(sde, score_fn, False, generator).update_fn(x, vec_eps)
        nfe += 1
    return x, nfe


def edm_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels (Karras et al., 2022, Eq. 5), descending, with a final 0 appended (float64, length N+1).

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1; sigma_N = 0.
    """
    i = torch.arange(num_steps, dtype=torch.float64)
    if num_steps == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        s = (a + i / (num_steps - 1) * (b - a)) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.inference_mode()
def heun_sampler(
    sde,
    score_fn,
    shape,
    num_steps: int = 18,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    *,
    eps: float = 1e-3,
    device=None,
    dtype=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """EDM's deterministic sampler (Karras et al., 2022, Algorithm 1 with S_churn = 0) on the probability-flow ODE.

    Written in the noise-level variable: any of our SDEs has x(t) = s(t) x_hat with x_hat ~ p_data * N(0, sigma^2 I),
    sigma(t) = std(t) / s(t) (``sde.noise_level``; s = 1 for VE). The probability-flow ODE is then
    d x_hat / d sigma = -sigma grad log p(x_hat; sigma) = -sigma s(t) score_fn(s(t) x_hat, t(sigma)).
    Levels: ``edm_sigmas`` between sigma(T) and sigma(eps), then 0. Each step is Euler plus Heun's
    correction, except the last (to sigma = 0), so ``num_steps`` = 18 costs 2 * 18 - 1 = 35 evaluations.
    Starts from x_hat ~ N(0, sigma_max^2 I) as EDM does. Returns ``(x, nfe)``.
    """
    counted = _CountingScore(score_fn)
    dev = _device(generator, device)
    dtype = dtype or torch.get_default_dtype()
    T = torch.tensor([sde.T], dtype=torch.float64)
    sigma_max = float(sde.noise_level(T)[0])
    sigma_min = float(sde.noise_level(torch.tensor([eps], dtype=torch.float64))[0])
    sigmas = edm_sigmas(sigma_min, sigma_max, num_steps, rho)
    # t(sigma) and s(t) for each level, in float64 (the inverse maps are smooth but steep near t = 0).
    ts = sde.noise_level_to_t(sigmas[:-1])
    scales = sde.mean_coeff(ts)

    def denoiser_direction(x_hat, j):
        # d x_hat / d sigma at level j: -sigma_j s_j score(s_j x_hat, t_j)
        t = torch.full((x_hat.shape[0],), float(ts[j]), device=x_hat.device, dtype=x_hat.dtype)
        s = float(scales[j])
        return -float(sigmas[j]) * s * counted(s * x_hat, t)

    x = torch.randn(tuple(shape), generator=generator, device=dev, dtype=dtype) * sigma_max
    for j in _progress(range(num_steps), progress, desc="heun"):
        h = float(sigmas[j + 1] - sigmas[j])
        d = denoiser_direction(x, j)
        x_next = x + h * d
        if j < num_steps - 1:  # 2nd-order correction, skipped for the step to sigma = 0
            d2 = denoiser_direction(x_next, j + 1)
            x_next = x + h * 0.5 * (d + d2)
        x = x_next
    return x, counted.nfe


_SAMPLERS = {
    "pc": pc_sampler,
    "ode": ode_sampler,
    "heun": heun_sampler,
    "annealed_langevin": annealed_langevin,
    "langevin": langevin,
}


def get_sampler(name: str):
    """Sampler function by name: pc, ode, heun, annealed_langevin, langevin."""
    key = str(name).lower()
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(_SAMPLERS)}")
    return _SAMPLERS[key]
