"""Score-matching objectives. Every loss returns a scalar tensor: the mean over the batch of a per-sample loss.

- :func:`score_matching_loss`        Hyvarinen (2005), Eq. 4:   E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ]
- :func:`sliced_score_matching_loss` Song, Garg, Shi & Ermon (2019), "Sliced Score Matching", Eq. 7-8 (SSM)
                                     and the variance-reduced form SSM-VR (their Eq. 9)
- :func:`dsm_loss`                   Song & Ermon (2019), Eq. 5-6 (NCSN, denoising score matching, lambda = sigma^p)
- :func:`sde_dsm_loss`               Song et al. (2021), Eq. 7 (continuous-time DSM, score_sde's ``get_sde_loss_fn``)
- :func:`ddpm_loss`                  Ho, Jain & Abbeel (2020), Eq. 14 (L_simple, epsilon prediction)
- :func:`scoresde.edm.edm_loss`      Karras et al. (2022), Eq. 8 (EDM: preconditioned denoiser, lognormal sigma)

:func:`get_objective` names the objectives a network is trained with and returns the closure
``loss_fn(model, x, generator)`` that :func:`scoresde.training.train` minimises: ``"dsm"`` (NCSN),
``"sde_dsm"`` (VE / VP / sub-VP) and ``"edm"`` (an EDM-preconditioned model).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .edm import edm_loss
from .sde import bcast

__all__ = [
    "score_matching_loss",
    "sliced_score_matching_loss",
    "dsm_loss",
    "sde_dsm_loss",
    "ddpm_loss",
    "edm_loss",
    "get_objective",
    "objective_names",
    "objective_settings",
]


def _flat_sum(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(dim=1)


def score_matching_loss(score_fn, x: torch.Tensor) -> torch.Tensor:
    """Exact (implicit) score matching, E[ tr(grad_x s(x)) + 1/2 ||s(x)||^2 ] (Hyvarinen, 2005).

    The Jacobian trace takes one backward pass per data dimension (so this is for low dimensions; that
    cost is what sliced score matching removes). ``create_graph=True`` keeps the trace differentiable so
    the loss trains the parameters of ``score_fn``.
    """
    x = x.detach().requires_grad_(True)
    s = score_fn(x)
    s_flat = s.reshape(s.shape[0], -1)
    trace = torch.zeros(x.shape[0], dtype=s.dtype, device=s.device)
    for i in range(s_flat.shape[1]):
        # d s_i / d x_i for every sample at once (samples are independent, so summing over the batch is exact)
        g = torch.autograd.grad(s_flat[:, i].sum(), x, create_graph=True)[0]
        trace = trace + g.reshape(g.shape[0], -1)[:, i]
    return (trace + 0.5 * s_flat.pow(2).sum(dim=1)).mean()


def sliced_score_matching_loss(
    score_fn,
    x: torch.Tensor,
    n_projections: int = 1,
    variance_reduction: bool = False,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "gaussian",
) -> torch.Tensor:
    """Sliced score matching, an unbiased estimate of the same objective as :func:`score_matching_loss`.

    SSM:    (1/M) sum_j [ v_j^T grad_x s(x) v_j + 1/2 (v_j^T s(x))^2 ]
    SSM-VR: (1/M) sum_j   v_j^T grad_x s(x) v_j + 1/2 ||s(x)||^2     (E[v v^T] = I replaced exactly)

    with M = ``n_projections`` directions per sample, v ~ N(0, I) (or Rademacher). Only Hessian-vector
    products are needed: grad_x (v^T s(x)) = (grad_x s)^T v, then dot with v. Unlike the SSM reference code
    the v's are not normalised, so E[v v^T] = I and the estimate equals Hyvarinen's objective in
    expectation, not a 1/D multiple of it.
    """
    b = x.shape[0]
    xs = x.detach().unsqueeze(0).expand(n_projections, *x.shape).reshape(n_projections * b, *x.shape[1:])
    xs = xs.clone().requires_grad_(True)
    if distribution == "gaussian":
        v = torch.randn(xs.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif distribution == "rademacher":
        v = torch.randint(0, 2, xs.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    else:
        raise ValueError("distribution must be 'gaussian' or 'rademacher'")
    s = score_fn(xs)
    vs = _flat_sum(v * s)  # v^T s, (M*B,)
    hvp = torch.autograd.grad(vs.sum(), xs, create_graph=True)[0]
    vjv = _flat_sum(v * hvp)  # v^T (grad_x s) v
    if variance_reduction:
        quad = 0.5 * _flat_sum(s * s)
    else:
        quad = 0.5 * vs**2
    per = (vjv + quad).reshape(n_projections, b).mean(dim=0)
    return per.mean()


def _as_sigmas(sigmas, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(sigmas, dtype=x.dtype, device=x.device).reshape(-1)


def dsm_loss(
    score_fn,
    x: torch.Tensor,
    sigmas,
    anneal_power: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NCSN's denoising score matching over L noise levels (Song & Ermon, 2019, Eq. 5-6).

    Each sample gets one level sigma = sigmas[i], i ~ U{0..L-1} (drawn with ``generator``), and
    x_tilde = x + sigma z. Per sample, lambda(sigma) l(sigma) with lambda(sigma) = sigma^anneal_power and
    l(sigma) = 1/2 || s(x_tilde, sigma) + (x_tilde - x) / sigma^2 ||^2, i.e. (as computed, exactly equal)
    1/2 || sigma s(x_tilde, sigma) + z ||^2 sigma^(anneal_power - 2). ``score_fn(x, sigma)`` gets sigma of
    shape (batch,). Averaging over the batch estimates (1/L) sum_i lambda(sigma_i) l(sigma_i).
    """
    sig = _as_sigmas(sigmas, x)
    idx = torch.randint(0, sig.shape[0], (x.shape[0],), generator=generator, device=x.device)
    used = sig[idx]
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_tilde = x + bcast(used, x) * z
    s = score_fn(x_tilde, used)
    per = 0.5 * _flat_sum((s * bcast(used, x) + z) ** 2) * used ** (anneal_power - 2.0)
    return per.mean()


def sde_dsm_loss(
    sde,
    score_fn,
    x: torch.Tensor,
    likelihood_weighting: bool = False,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continuous-time denoising score matching (Song et al., 2021, Eq. 7), as score_sde computes it.

    t ~ U(eps, T), z ~ N(0, I), x(t) = mean(t) x + std(t) z, the target score is -z / std(t):
    - default lambda(t) = std(t)^2:          1/2 || s(x(t), t) std(t) + z ||^2
    - likelihood_weighting, lambda = g(t)^2: 1/2 g(t)^2 || s(x(t), t) + z / std(t) ||^2
      (Song, Durkan, Murray & Ermon, 2021, "Maximum Likelihood Training of Score-Based Diffusion Models").
    ``score_fn(x, t)`` gets t of shape (batch,). ``eps`` keeps t away from 0 where std(t) -> 0.
    """
    t = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype) * (sde.T - eps) + eps
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    mean, std = sde.marginal_prob(x, t)
    xt = mean + bcast(std, x) * z
    s = score_fn(xt, t)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x), t)[1] ** 2
        per = 0.5 * _flat_sum((s + z / bcast(std, x)) ** 2) * g2
    else:
        per = 0.5 * _flat_sum((s * bcast(std, x) + z) ** 2)
    return per.mean()


def ddpm_loss(
    eps_fn,
    x: torch.Tensor,
    betas,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM's L_simple (Ho et al., 2020, Eq. 14): E_{i, x, eps} || eps - eps_theta(x_i, i) ||^2.

    The discrete VP chain has alpha_bar_i = prod_{j<=i} (1 - beta_j) and
    x_i = sqrt(alpha_bar_i) x + sqrt(1 - alpha_bar_i) eps. ``betas`` has length N (e.g.
    ``VPSDE(...).discrete_betas``); the level index i ~ U{0..N-1} is drawn per sample with ``generator``.

    ``eps_fn(x_i, i)`` receives the *integer* level indices, a long tensor of shape (batch,), in 0..N-1
    (wrap a t-conditioned network as ``lambda x, i: net(x, i.float() / (N - 1))`` or similar). The squared
    error is summed over data dimensions (score_sde's DDPM loss with ``reduce_mean=False``).
    """
    b = torch.as_tensor(betas, dtype=torch.float64, device=x.device).reshape(-1)
    alphas_cumprod = torch.cumprod(1.0 - b, dim=0).to(x.dtype)
    i = torch.randint(0, b.shape[0], (x.shape[0],), generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    ab = alphas_cumprod[i]
    xi = bcast(torch.sqrt(ab), x) * x + bcast(torch.sqrt(1.0 - ab), x) * noise
    return _flat_sum((eps_fn(xi, i) - noise) ** 2).mean()


# --------------------------------------------------------------------------------- objectives by name
def _dsm_objective(*, sigmas, anneal_power: float = 2.0):
    from .models import get_score_fn

    return lambda model, x, g: dsm_loss(get_score_fn(model), x, sigmas, anneal_power=anneal_power, generator=g)


def _sde_dsm_objective(*, sde, likelihood_weighting: bool = False, eps: float = 1e-5):
    from .models import get_score_fn

    return lambda model, x, g: sde_dsm_loss(sde, get_score_fn(model, sde), x, likelihood_weighting=likelihood_weighting,
                                            eps=eps, generator=g)


def _edm_objective(*, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float | None = None):
    from .models import _unwrap

    def loss_fn(model, x, g):
        inner = _unwrap(model)
        if getattr(inner, "precond", None) != "edm":
            raise TypeError(f"the 'edm' objective trains an EDM denoiser (build_model with precond: edm), "
                            f"got {type(inner).__name__}")
        # σ_d of the loss weight must be the one the denoiser's c_skip/c_out use (Karras et al., 2022, Table 1).
        sd = inner.sigma_data if sigma_data is None else float(sigma_data)
        return edm_loss(model, x, P_mean=P_mean, P_std=P_std, sigma_data=sd, generator=g)

    return loss_fn


_OBJECTIVES: dict[str, Callable] = {"dsm": _dsm_objective, "sde_dsm": _sde_dsm_objective, "edm": _edm_objective}


def objective_names() -> list[str]:
    return list(_OBJECTIVES)


def objective_settings(name: str) -> tuple[str, ...]:
    """The settings ``get_objective(name, ...)`` accepts."""
    return tuple(inspect.signature(_OBJECTIVES[_objective_key(name)]).parameters)


def _objective_key(name: str) -> str:
    key = str(name).lower()
    if key not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(_OBJECTIVES)}")
    return key


def get_objective(name: str, **settings) -> Callable[[torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]:
    """The training closure ``loss_fn(model, x, generator)`` of an objective, for :func:`scoresde.training.train`.

    - ``"dsm"`` (settings ``sigmas``, ``anneal_power``): :func:`dsm_loss` of ``get_score_fn(model)`` (NCSN);
    - ``"sde_dsm"`` (``sde``, ``likelihood_weighting``, ``eps``): :func:`sde_dsm_loss` of ``get_score_fn(model, sde)``;
    - ``"edm"`` (``P_mean``, ``P_std``, ``sigma_data``): :func:`scoresde.edm.edm_loss` of the model itself, an
      EDM denoiser (``build_model({..., "precond": "edm"})``); σ_d defaults to the model's own.

    ``model`` may be DDP-wrapped: it is called through the wrapper, so gradients are synchronised.
    Unknown settings raise ``TypeError`` naming them.
    """
    key = _objective_key(name)
    unknown = sorted(set(settings) - set(objective_settings(key)))
    if unknown:
        raise TypeError(f"objective {key!r} takes no setting(s) {unknown}; it takes {list(objective_settings(key))}")
    return _OBJECTIVES[key](**settings)
