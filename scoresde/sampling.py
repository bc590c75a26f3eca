"""Samplers driven by a score function.

- :func:`langevin`            unadjusted Langevin dynamics (Welling & Teh, 2011; article Eq. "Langevin")
- :func:`annealed_langevin`   NCSN's annealed Langevin dynamics (Song & Ermon, 2019, Alg. 1)
- :func:`scoresde.pc.pc_sampler` predictor-corrector sampling of the reverse SDE (Song et al., 2021, Alg. 1-3)
- :func:`ode_sampler`         probability-flow ODE (Song et al., 2021, Eq. 13) with scipy's adaptive RK45
- :func:`heun_sampler`        EDM's 2nd-order sampler (Karras et al., 2022, Alg. 1; Alg. 2 with stochastic churn)
- :func:`scoresde.dpm_solver.dpm_solver_pp_2m` DPM-Solver++(2M) on the probability-flow ODE (Lu et al., 2022, Alg. 2)

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

from .dpm_solver import dpm_solver_pp_2m
from .pc import ReverseDiffusionPredictor, _CountingScore, _device, _progress, _randn_like, pc_sampler

__all__ = [
    "langevin",
    "annealed_langevin",
    "ode_sampler",
    "heun_sampler",
    "dpm_solver_pp_2m",
    "edm_sigmas",
    "get_sampler",
    "sampler_names",
    "sampler_settings",
    "sigma_conditioned",
    "Sampler",
]


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
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = math.inf,
    S_noise: float = 1.0,
    device=None,
    dtype=None,
    progress: bool = False,
) -> tuple[torch.Tensor, int]:
    """EDM's sampler (Karras et al., 2022, Algorithm 2; with the default S_churn = 0 it is Algorithm 1, the
    deterministic Heun solver of the probability-flow ODE).

    Written in the noise-level variable: any of our SDEs has x(t) = s(t) x_hat with x_hat ~ p_data * N(0, sigma^2 I),
    sigma(t) = std(t) / s(t) (``sde.noise_level``; s = 1 for VE). The probability-flow ODE is then
    d x_hat / d sigma = -sigma grad log p(x_hat; sigma) = -sigma s(t) score_fn(s(t) x_hat, t(sigma)).
    Levels: ``edm_sigmas`` between sigma(T) and sigma(eps) (Eq. 5, ``rho``), then 0. Each step is Euler plus
    Heun's correction, except the last (to sigma = 0), so ``num_steps`` = 18 costs 2 * 18 - 1 = 35 evaluations.
    Starts from x_hat ~ N(0, sigma_max^2 I) as EDM does. Returns ``(x, nfe)``.

    Stochastic churn (Alg. 2, lines 4-6): at each level sigma_i in [S_tmin, S_tmax] the step first raises the
    noise to sigma_hat = (1 + gamma) sigma_i, gamma = min(S_churn / N, sqrt(2) - 1) (the cap at most doubles
    the noise variance), by adding fresh noise
    sqrt(sigma_hat^2 - sigma_i^2) S_noise z (drawn from ``generator``), then takes the Heun step from sigma_hat
    to sigma_{i+1}: a Langevin-like correction of the errors of earlier steps at the same NFE. With churn
    off (or no level in range) no random number is drawn and the result is bit-identical to Algorithm 1.
    At the first level sigma_hat exceeds sigma(T) (t(sigma_hat) > T) unless S_tmax < sigma(T), as in EDM.
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
    gamma_max = min(float(S_churn) / num_steps, math.sqrt(2.0) - 1.0) if S_churn > 0 else 0.0

    def direction(x_hat, sigma: float, t: float, s: float):
        # d x_hat / d sigma at level sigma: -sigma s score(s x_hat, t(sigma))
        vec_t = torch.full((x_hat.shape[0],), t, device=x_hat.device, dtype=x_hat.dtype)
        return -sigma * s * counted(s * x_hat, vec_t)

    def denoiser_direction(x_hat, j):
        return direction(x_hat, float(sigmas[j]), float(ts[j]), float(scales[j]))

    x = torch.randn(tuple(shape), generator=generator, device=dev, dtype=dtype) * sigma_max
    for j in _progress(range(num_steps), progress, desc="heun"):
        sigma_j = float(sigmas[j])
        gamma = gamma_max if S_tmin <= sigma_j <= S_tmax else 0.0
        if gamma > 0:  # Alg. 2 lines 4-6: churn, then the first derivative at the raised level sigma_hat
            sigma_hat = torch.tensor([sigma_j * (1.0 + gamma)], dtype=torch.float64)
            t_hat = sde.noise_level_to_t(sigma_hat)
            s_hat = float(sde.mean_coeff(t_hat)[0])
            sig_hat = float(sigma_hat[0])
            x = x + math.sqrt(sig_hat**2 - sigma_j**2) * S_noise * _randn_like(x, generator)
            d = direction(x, sig_hat, float(t_hat[0]), s_hat)
            h = float(sigmas[j + 1] - sigma_hat[0])
        else:  # Alg. 1 (kept literally so that no churn reproduces it bit for bit)
            h = float(sigmas[j + 1] - sigmas[j])
            d = denoiser_direction(x, j)
        x_next = x + h * d
        if j < num_steps - 1:  # 2nd-order correction, skipped for the step to sigma = 0
            d2 = denoiser_direction(x_next, j + 1)
            x_next = x + h * 0.5 * (d + d2)
        x = x_next
    return x, counted.nfe


# ---------------------------------------------------------------------------------- one interface
class Sampler:
    """A configured sampler: ``sampler(score_fn, shape, *, generator, device=None, progress=False) -> (x, nfe)``.

    ``conditioning`` says which score function it takes: ``"sigma"`` -> ``score_fn(x, sigma)`` (Langevin
    samplers, in noise-level space), ``"time"`` -> ``score_fn(x, t)`` (the SDE samplers). nfe, the number of
    score-function calls per sample, is counted inside.
    """

    def __init__(self, name: str, conditioning: str, run: Callable, settings: dict):
        self.name, self.conditioning, self._run, self.settings = name, conditioning, run, settings

    def __call__(self, score_fn, shape, *, generator: torch.Generator | None = None, device=None,
                 progress: bool = False) -> tuple[torch.Tensor, int]:
        counted = _CountingScore(score_fn)
        x = self._run(counted, tuple(shape), generator, _device(generator, device), progress)
        return x, counted.nfe

    def __repr__(self) -> str:
        return f"Sampler({self.name!r}, {self.settings})"


def _uniform_init(shape, generator, device) -> torch.Tensor:
    # NCSN starts its Langevin chains from uniform noise on the data range [0, 1].
    return torch.rand(shape, generator=generator, device=device)


def _annealed_langevin(*, sigmas, n_steps_each: int = 100, step_lr: float, denoise: bool = True):
    def run(score_fn, shape, generator, device, progress):
        x0 = _uniform_init(shape, generator, device)
        return annealed_langevin(score_fn, x0, sigmas, n_steps_each, step_lr=step_lr, denoise=denoise,
                                 generator=generator, progress=progress)
    return run


def _langevin(*, sigmas, n_steps_each: int = 100, step_lr: float, sigma: float | None = None):
    # Langevin without annealing: one fixed sigma (default sigma_L), the budget of annealed Langevin
    # (L * n_steps_each steps) and the step size alpha = eps sigma^2 / sigma_L^2 it would use at that sigma.
    sigma_L = float(sigmas[-1])
    sigma = sigma or sigma_L
    steps = len(sigmas) * n_steps_each

    def run(score_fn, shape, generator, device, progress):
        level = torch.full((shape[0],), sigma, device=device)
        x0 = _uniform_init(shape, generator, device)
        return langevin(lambda y: score_fn(y, level), x0, step_lr * (sigma / sigma_L) ** 2, steps,
                        generator=generator, progress=progress)
    return run


def _pc(*, sde, predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
        n_corrector_steps: int = 1, denoise: bool = True, eps: float = 1e-3):
    def run(score_fn, shape, generator, device, progress):
        return pc_sampler(sde, score_fn, shape, predictor=predictor, corrector=corrector, snr=snr,
                          n_corrector_steps=n_corrector_steps, denoise=denoise, eps=eps, generator=generator,
                          device=device, progress=progress)[0]
    return run


def _ode(*, sde, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45", eps: float = 1e-3):
    def run(score_fn, shape, generator, device, progress):
        return ode_sampler(sde, score_fn, shape, rtol=rtol, atol=atol, method=method, eps=eps, generator=generator,
                           device=device)[0]
    return run


def _heun(*, sde, num_steps: int = 18, rho: float = 7.0, eps: float = 1e-3, S_churn: float = 0.0,
          S_tmin: float = 0.0, S_tmax: float = math.inf, S_noise: float = 1.0):
    def run(score_fn, shape, generator, device, progress):
        return heun_sampler(sde, score_fn, shape, num_steps=num_steps, rho=rho, eps=eps, S_churn=S_churn,
                            S_tmin=S_tmin, S_tmax=S_tmax, S_noise=S_noise, generator=generator, device=device,
                            progress=progress)[0]
    return run


def _dpm_solver(*, sde, steps: int = 20, eps: float = 1e-3, skip_type: str = "logSNR",
                lower_order_final: bool = True):
    def run(score_fn, shape, generator, device, progress):
        return dpm_solver_pp_2m(sde, score_fn, shape, steps=steps, eps=eps, skip_type=skip_type,
                                lower_order_final=lower_order_final, generator=generator, device=device,
                                progress=progress)[0]
    return run


# name -> (factory of the run function, conditioning of the score function it takes)
_SAMPLERS = {
    "annealed_langevin": (_annealed_langevin, "sigma"),
    "langevin": (_langevin, "sigma"),
    "pc": (_pc, "time"),
    "ode": (_ode, "time"),
    "heun": (_heun, "time"),
    "dpm_solver": (_dpm_solver, "time"),
}


def sampler_names() -> list[str]:
    return list(_SAMPLERS)


def sampler_settings(name: str) -> tuple[str, ...]:
    """The settings ``get_sampler(name, ...)`` accepts (``sigmas`` or ``sde`` among them)."""
    import inspect

    factory, _ = _SAMPLERS[_sampler_key(name)]
    return tuple(inspect.signature(factory).parameters)


def _sampler_key(name: str) -> str:
    key = str(name).lower()
    if key not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(_SAMPLERS)}")
    return key


def get_sampler(name: str, **settings) -> Sampler:
    """A configured :class:`Sampler` by name: ``annealed_langevin`` / ``langevin`` (settings ``sigmas``,
    ``n_steps_each``, ``step_lr``, …), ``pc`` / ``ode`` / ``heun`` / ``dpm_solver`` (setting ``sde`` and the
    solver's own).

    Unknown settings raise ``TypeError`` naming them; :func:`sampler_settings` lists the accepted ones.
    """
    key = _sampler_key(name)
    factory, conditioning = _SAMPLERS[key]
    unknown = sorted(set(settings) - set(sampler_settings(key)))
    if unknown:
        raise TypeError(f"sampler {key!r} takes no setting(s) {unknown}; it takes {list(sampler_settings(key))}")
    return Sampler(key, conditioning, factory(**settings), settings)


def sigma_conditioned(score_t, sde):
    """A time-conditioned SDE score ``score_t(x, t)`` as ``score(x, sigma)``, through ``sde.noise_level_to_t``
    (so that Langevin samplers can run on a VE model)."""
    def score(x, sigma):
        return score_t(x, sde.noise_level_to_t(sigma))
    return score
