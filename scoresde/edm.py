"""EDM preconditioning and training objective (Karras, Aittala, Aila & Laine, 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", NeurIPS; "EDM").

EDM writes every diffusion model in the noise-level variable: x = y + n, y ~ p_data, n ~ N(0, σ² I), and
trains a *denoiser* D(x; σ) ≈ E[y | x] (Eq. 2-3). Its score is (Table 1 / Eq. 3)

    ∇_x log p(x; σ) = (D(x; σ) − x) / σ².

The denoiser is a network F_θ wrapped with σ-dependent scalings (Eq. 7, Table 1 "Ours"):

    D_θ(x; σ) = c_skip(σ) x + c_out(σ) F_θ(c_in(σ) x; c_noise(σ)),
    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ,

chosen so that the network's input and its training target have unit variance at every σ (App. B.6), and
trained with (Eq. 8, Table 1)

    E_{σ, y, n} [ λ(σ) ‖D_θ(y + n; σ) − y‖² ],  ln σ ~ N(P_mean, P_std²),  λ(σ) = (σ² + σ_d²) / (σ σ_d)².

- :func:`edm_coefficients`  c_skip, c_out, c_in, c_noise (Table 1)
- :class:`EDMPrecond`       D_θ around one of the project's networks (built by ``build_model({..., "precond": "edm"})``)
- :func:`edm_loss`          the training objective (Eq. 8 with Table 1's λ and p_train)
- :func:`edm_sde_score`     the denoiser as a time-conditioned score ``score(x, t)`` of any of our SDEs

σ_d = 0.5 (EDM's default) is the data standard deviation for images in [−1, 1]; data in [0, 1] has a
smaller spread, so set ``sigma_data`` to it (CIFAR-10 in [0, 1]: ≈ 0.25).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sde import bcast

__all__ = ["edm_coefficients", "EDMPrecond", "edm_loss", "edm_sde_score", "edm_denoiser_score"]


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a (batch,) tensor in ``x``'s dtype/device (a scalar is broadcast)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape (batch,) = ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma


def edm_coefficients(sigma, sigma_data: float = 0.5):
    """EDM's preconditioning (Karras et al., 2022, Table 1 and Eq. 7): ``(c_skip, c_out, c_in, c_noise)``.

    c_skip = σ_d² / (σ² + σ_d²),  c_out = σ σ_d / √(σ² + σ_d²),  c_in = 1 / √(σ² + σ_d²),  c_noise = ¼ ln σ.

    ``sigma`` is a float or a tensor (any shape; the coefficients have its shape); σ_d = ``sigma_data``.
    c_skip + c_out² / σ_d² = 1: for σ → 0 the denoiser passes x through, for σ → ∞ it predicts from F alone.
    """
    sd2 = float(sigma_data) ** 2
    if isinstance(sigma, torch.Tensor):
        root = torch.sqrt(sigma**2 + sd2)
        return sd2 / (sigma**2 + sd2), sigma * sigma_data / root, 1.0 / root, 0.25 * torch.log(sigma)
    s = float(sigma)
    root = math.sqrt(s * s + sd2)
    return sd2 / (s * s + sd2), s * sigma_data / root, 1.0 / root, 0.25 * math.log(s)


class EDMPrecond(nn.Module):
    """The EDM denoiser D_θ(x; σ) = c_skip x + c_out F_θ(c_in x; c_noise) (Karras et al., 2022, Eq. 7).

    ``net`` is one of the project's networks, called ``net(x, c)`` (:mod:`scoresde.models`). It is fed c_noise
    = ¼ ln σ exactly as EDM's networks embed it, through the conditioning its embedding expects:

    - ``embedding="fourier"`` (the network embeds ``log c``): ``c = exp(c_noise) = σ^¼``, so the Fourier
      features are those of c_noise, as EDM's NCSN++ with EDM preconditioning;
    - ``embedding="sinusoidal"`` (the network embeds ``1000·c`` with DDPM frequencies 10000^(−k/(K−1))):
      ``c = c_noise / 1000``, so the features are EDM's ``PositionalEmbedding`` of c_noise (the same
      frequencies), as EDM's DDPM++ with EDM preconditioning.

    ``forward(x, sigma)`` returns D_θ(x; σ) (``sigma`` of shape (batch,) or a scalar); :meth:`score` returns
    ∇_x log p(x; σ) = (D_θ(x; σ) − x) / σ² (EDM Eq. 3). Build it with
    ``scoresde.models.build_model({..., "precond": "edm", "sigma_data": 0.5}, shape)``; its ``state_dict``
    holds the network's under ``net.`` (σ_d is a constructor argument, not a weight).
    """

    precond = "edm"

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not float(sigma_data) > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        embedding = getattr(net, "embedding", None)
        if embedding not in ("fourier", "sinusoidal"):
            raise ValueError(f"EDMPrecond needs a network with embedding 'fourier' or 'sinusoidal', got {embedding!r}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.net_embedding = embedding

    def net_condition(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The conditioning ``c`` to pass to ``net`` so that it embeds c_noise (see the class docstring)."""
        if self.net_embedding == "fourier":
            return torch.exp(c_noise)  # the network takes log c = c_noise
        scale = float(getattr(getattr(self.net, "embed", None), "scale", 1000.0))
        return c_noise / scale  # the network multiplies by its scale (1000): the embedding sees c_noise

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.net(bcast(c_in, x) * x, self.net_condition(c_noise))
        return bcast(c_skip, x) * x + bcast(c_out, x) * F_x.to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """∇_x log p(x; σ) = (D_θ(x; σ) − x) / σ² (Karras et al., 2022, Eq. 3)."""
        sigma = _batch_sigma(sigma, x)
        return (self(x, sigma) - x) / bcast(sigma**2, x)


def edm_denoiser_score(denoiser):
    """σ-conditioned score ``score(x, sigma) = (D(x; σ) − x) / σ²`` (EDM Eq. 3) of a denoiser callable
    ``denoiser(x, sigma)`` (e.g. an :class:`EDMPrecond`, possibly DDP-wrapped), for the Langevin samplers."""

    def score(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = _batch_sigma(sigma, x)
        return (denoiser(x, sigma) - x) / bcast(sigma**2, x)

    return score


def edm_sde_score(denoiser, sde):
    """The denoiser as the time-conditioned score ``score(x, t)`` of ``sde`` (VE, VP or sub-VP).

    Every SDE of Song et al. (2021) has x(t) = s(t) x̂ with x̂ = y + σ(t) n (Karras et al., 2022, Eq. 4;
    s = ``sde.mean_coeff``, σ = ``sde.noise_level``), so p_t(x) = s^{−d} p(x / s; σ(t)) and

        ∇_x log p_t(x) = (1 / s) ∇ log p(x̂; σ) = (D(x / s; σ(t)) − x / s) / (s σ(t)²).

    With this, an EDM-trained denoiser runs in every t-conditioned sampler (PC, probability-flow ODE,
    Heun, DPM-Solver++); under VE (s = 1) it is EDM Eq. 3 at σ = σ(t).
    """

    def score(x: torch.Tensor, t) -> torch.Tensor:
        t = _batch_sigma(t, x)
        s = sde.mean_coeff(t).to(x.dtype)
        sigma = sde.noise_level(t).to(x.dtype)
        x_hat = x / bcast(s, x)
        return (denoiser(x_hat, sigma) - x_hat) / bcast(s * sigma**2, x)

    return score


def edm_loss(
    denoiser,
    x0: torch.Tensor,
    *,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """EDM's training loss (Karras et al., 2022, Eq. 8 with Table 1's "Ours" column), NVlabs/edm's ``EDMLoss``.

    Per sample: ln σ ~ N(P_mean, P_std²), n ~ N(0, σ² I) (both drawn with ``generator``, σ first), and
    λ(σ) ‖D(x0 + n; σ) − x0‖² with λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out², which makes the effective
    target of F unit-variance (App. B.6). The squared error is summed over data dimensions and averaged
    over the batch (EDM sums and divides by the batch size). ``denoiser(x, sigma)`` gets σ of shape
    (batch,); σ_d must be the ``sigma_data`` the denoiser was built with.
    """
    b = x0.shape[0]
    rnd = torch.randn(b, generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = torch.exp(rnd * P_std + P_mean)
    n = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) * bcast(sigma, x0)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D = denoiser(x0 + n, sigma)
    per = (D - x0).pow(2).reshape(b, -1).sum(dim=1) * weight
    return per.mean()
