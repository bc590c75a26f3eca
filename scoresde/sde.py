"""Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, T=1] and their reversals.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), "Score-Based Generative Modeling through
Stochastic Differential Equations" (ICLR), Sec. 3.4 (VE, VP, sub-VP), Eq. 6 (reverse SDE), Eq. 13
(probability-flow ODE), App. B (marginals) and App. E (SMLD / DDPM discretisations). The interface follows
score_sde_pytorch's ``sde_lib.py``.

Conventions: ``x`` is ``(batch, *dims)``; ``t`` is a 1-D tensor of shape ``(batch,)``; diffusion
coefficients and marginal standard deviations come back with shape ``(batch,)``. Use :func:`bcast` to
multiply a ``(batch,)`` tensor into ``x``'s shape.
"""

from __future__ import annotations

import abc
import math

import torch

__all__ = ["SDE", "VESDE", "VPSDE", "SubVPSDE", "ReverseSDE", "get_sde", "bcast"]


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor ``v`` of shape (batch,) to broadcast against ``x`` (batch, *dims)."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _gaussian_logp(z: torch.Tensor, std: float) -> torch.Tensor:
    """log N(z; 0, std^2 I), summed over all non-batch dimensions (any data shape)."""
    d = z[0].numel()
    sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
    return -0.5 * d * math.log(2 * math.pi * std**2) - sq / (2 * std**2)


def _default_device(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


class SDE(abc.ABC):
    """An Ito SDE dx = f(x, t) dt + g(t) dw with a Gaussian perturbation kernel p_0t(x(t) | x(0))."""

    T: float = 1.0

    def __init__(self, N: int):
        self.N = int(N)  # number of discretisation steps used by samplers

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shape of x) and diffusion g(t) (shape (batch,))."""

    @abc.abstractmethod
    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (shape of x) and std (shape (batch,)) of p_0t(x(t) | x(0) = x)."""

    @abc.abstractmethod
    def prior_sampling(self, shape, generator: torch.Generator | None = None, device=None, dtype=None):
        """A sample of p_T (the Gaussian the reverse process starts from)."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log p_T(z) in nats per sample, summed over all non-batch dimensions."""

    @abc.abstractmethod
    def noise_level(self, t: torch.Tensor) -> torch.Tensor:
        """Equivalent noise level sigma(t) = std(t) / mean_coeff(t) (Karras et al., 2022, Eq. 4)."""

    @abc.abstractmethod
    def noise_level_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`noise_level`."""

    def mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) with E[x(t) | x(0)] = s(t) x(0), shape (batch,)."""
        one = torch.ones(t.shape[0], 1, dtype=t.dtype, device=t.device)
        return self.marginal_prob(one, t)[0][:, 0]

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step x_{i+1} = x_i + f_i + G_i z_i; Euler-Maruyama with dt = T/N by default."""
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def _timestep(self, t: torch.Tensor) -> torch.Tensor:
        # Index of the discrete level for continuous t, as score_sde does: t in [eps, T] -> 0..N-1.
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    def reverse(self, score_fn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (Eq. 6) or, with ``probability_flow``, the probability-flow ODE (Eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """dx = [f(x, t) - c g(t)^2 s(x, t)] dt + g(t) dw_bar, run from T to 0 (c = 1, or 1/2 with no noise).

    ``sde``/``discretize`` keep the forward-time sign convention of score_sde: a reverse step is
    ``x - f + G z`` (reverse diffusion) or ``x + drift * dt`` with negative ``dt`` (Euler-Maruyama).
    """

    def __init__(self, forward: SDE, score_fn, probability_flow: bool = False):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.N = forward.N
        self.T = forward.T

    def _reverse(self, f: torch.Tensor, G: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        # f - G^2 s(x, t) (reverse SDE, Eq. 6), or f - G^2 s / 2 with no noise (probability flow, Eq. 13)
        c = 0.5 if self.probability_flow else 1.0
        rev_f = f - bcast(G**2, x) * self.score_fn(x, t) * c
        return rev_f, (torch.zeros_like(G) if self.probability_flow else G)

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._reverse(*self.forward.sde(x, t), x, t)

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the forward discretisation (Song et al., 2021, Eq. 46-47: reverse diffusion)."""
        return self._reverse(*self.forward.discretize(x, t), x, t)


class VESDE(SDE):
    """Variance Exploding SDE, the continuous limit of SMLD/NCSN (Song et al., 2021, Eq. 9/30).

    sigma(t) = sigma_min (sigma_max / sigma_min)^t,  dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw.
    ``marginal_prob`` returns std = sigma(t), which, as in the paper, omits the -sigma_min^2 that the exact
    variance sigma(t)^2 - sigma_min^2 of the SDE started at x(0) would have: x(0) is taken to be data
    already perturbed with sigma_min.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        # SMLD's noise levels sigma_1 < ... < sigma_N, geometric (float64, then float32 like the networks).
        self.discrete_sigmas = torch.exp(
            torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N, dtype=torch.float64)
        ).float()

    def _sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        drift = torch.zeros_like(x)
        diffusion = self._sigma(t) * math.sqrt(2 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return drift, diffusion

    def marginal_prob(self, x, t):
        return x, self._sigma(t)

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        device = _default_device(generator, device)
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype) * self.sigma_max

    def prior_logp(self, z):
        return _gaussian_logp(z, self.sigma_max)

    def noise_level(self, t):
        return self._sigma(t)

    def noise_level_to_t(self, sigma):
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discretize(self, x, t):
        """SMLD discretisation (Song et al., 2021, Eq. 45): x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z."""
        i = self._timestep(t)
        sigmas = self.discrete_sigmas.to(device=t.device, dtype=t.dtype)
        sigma = sigmas[i]
        adjacent = torch.where(i == 0, torch.zeros_like(sigma), sigmas[(i - 1).clamp(min=0)])
        return torch.zeros_like(x), torch.sqrt(sigma**2 - adjacent**2)


class _BetaSchedule(SDE):
    """Shared linear beta(t) = beta_min + t (beta_max - beta_min) and its DDPM discretisation."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_0 = float(beta_min)
        self.beta_1 = float(beta_max)
        # DDPM's beta_i = beta_bar_i / N with beta_bar linear in i (Song et al., 2021, App. B).
        self.discrete_betas = torch.linspace(self.beta_0 / self.N, self.beta_1 / self.N, self.N, dtype=torch.float64)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.discrete_betas = self.discrete_betas.float()
        self.alphas = self.alphas.float()
        self.alphas_cumprod = self.alphas_cumprod.float()

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t):
        """B(t) = int_0^t beta(s) ds."""
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t**2

    def _log_mean_coeff(self, t):
        return -0.5 * self.integrated_beta(t)

    def _t_from_integrated_beta(self, B):
        # Positive root of beta_0 t + (beta_1 - beta_0) t^2 / 2 = B.
        db = self.beta_1 - self.beta_0
        if abs(db) < 1e-12:
            return B / self.beta_0
        return (-self.beta_0 + torch.sqrt(self.beta_0**2 + 2 * db * B)) / db

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        device = _default_device(generator, device)
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return _gaussian_logp(z, 1.0)


class VPSDE(_BetaSchedule):
    """Variance Preserving SDE, the continuous limit of DDPM (Song et al., 2021, Eq. 11/32).

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw;  p_0t = N(x e^{-B(t)/2}, (1 - e^{-B(t)}) I), B = int beta.
    """

    def sde(self, x, t):
        beta_t = self.beta(t)
        return -0.5 * bcast(beta_t, x) * x, torch.sqrt(beta_t)

    def marginal_prob(self, x, t):
        lmc = self._log_mean_coeff(t)
        return bcast(torch.exp(lmc), x) * x, torch.sqrt(-torch.expm1(2.0 * lmc))

    def noise_level(self, t):
        # std / mean = sqrt(e^{B} - 1)
        return torch.sqrt(torch.expm1(self.integrated_beta(t)))

    def noise_level_to_t(self, sigma):
        return self._t_from_integrated_beta(torch.log1p(sigma**2))

    def discretize(self, x, t):
        """DDPM discretisation (Ho et al., 2020; Song et al., 2021, Eq. 46): x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z."""
        i = self._timestep(t)
        beta = self.discrete_betas.to(device=t.device, dtype=t.dtype)[i]
        alpha = self.alphas.to(device=t.device, dtype=t.dtype)[i]
        return bcast(torch.sqrt(alpha), x) * x - x, torch.sqrt(beta)


class SubVPSDE(_BetaSchedule):
    """sub-VP SDE (Song et al., 2021, Eq. 17): variance bounded by the VP SDE's, good likelihoods.

    dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - e^{-2 B(t)})) dw;  p_0t = N(x e^{-B/2}, (1 - e^{-B})^2 I).
    ``discretize`` is Euler-Maruyama (no classical discrete chain); the DDPM ``alphas`` are kept so that
    the Langevin corrector's step-size rescaling works as for VP (score_sde forgets them for sub-VP).
    """

    def sde(self, x, t):
        beta_t = self.beta(t)
        discount = -torch.expm1(-2.0 * self.integrated_beta(t))
        return -0.5 * bcast(beta_t, x) * x, torch.sqrt(beta_t * discount)

    def marginal_prob(self, x, t):
        lmc = self._log_mean_coeff(t)
        return bcast(torch.exp(lmc), x) * x, -torch.expm1(2.0 * lmc)

    def noise_level(self, t):
        # std / mean = (1 - e^{-B}) e^{B/2} = 2 sinh(B/2)
        return 2.0 * torch.sinh(0.5 * self.integrated_beta(t))

    def noise_level_to_t(self, sigma):
        return self._t_from_integrated_beta(2.0 * torch.asinh(0.5 * sigma))


_SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def get_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name: ``"ve"``, ``"vp"`` or ``"subvp"``; kwargs go to the constructor."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _SDES:
        raise ValueError(f"unknown SDE {name!r}; choose from {sorted(_SDES)}")
    return _SDES[key](**kwargs)
