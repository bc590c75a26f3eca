"""Closed-form checks of scoresde.sde: marginals against a simulation of the SDE itself, priors, discretisations."""

import math

import pytest
import torch

from scoresde import sde as sde_lib
from scoresde.sde import get_sde

SDES = ["ve", "vp", "subvp"]


def _euler_maruyama(sde, x0, t_end, n_steps, generator):
    """Simulate dx = f dt + g dw from x0 to t_end with the SDE's own sde() (fine steps, many paths)."""
    x = x0.clone()
    dt = t_end / n_steps
    for k in range(n_steps):
        t = torch.full((x.shape[0],), k * dt, dtype=x.dtype)
        drift, diffusion = sde.sde(x, t)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + drift * dt + diffusion[:, None] * math.sqrt(dt) * z
    return x


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("t_end", [0.5, 1.0])
def test_marginal_prob_matches_euler_maruyama(name, t_end):
    sde = get_sde(name)
    n, n_steps = 10000, 1000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(n, 2)
    xt = _euler_maruyama(sde, x0, t_end, n_steps, g)
    mean, std = sde.marginal_prob(x0[:1], torch.tensor([t_end], dtype=torch.float64))
    std = float(std[0])
    if name == "ve":
        # VE's std(t) = sigma_min (sigma_max/sigma_min)^t omits the -sigma_min^2 of the exact variance;
        # at t >= 0.5 (std >= 0.7) that term is < 2e-4 relative, below what we can resolve.
        assert sde.sigma_min**2 / std**2 < 1e-3
    emp_mean = xt.mean(dim=0)
    emp_std = xt.std(dim=0)
    se = std / math.sqrt(n)
    # mean within 5 standard errors (plus a 1% discretisation allowance); std within 3% (sampling
    # error ~0.7%, left-point rule bias of the EM grid < 1%).
    assert torch.allclose(emp_mean, mean[0], atol=5 * se + 0.01 * float(mean.abs().max()))
    assert torch.allclose(emp_std, torch.full_like(emp_std, std), rtol=0.03)


@pytest.mark.parametrize("name", SDES)
@pytest.mark.parametrize("shape", [(7, 2), (5, 3, 4, 4)])
def test_prior_logp_is_the_analytic_gaussian(name, shape):
    sde = get_sde(name)
    prior_std = sde.sigma_max if name == "ve" else 1.0
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * prior_std
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(prior_std, dtype=torch.float64))
    expected = normal.log_prob(z).reshape(shape[0], -1).sum(dim=1)
    got = sde.prior_logp(z)
    assert got.shape == (shape[0],)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("name", SDES)
def test_prior_sampling_shape_scale_and_generator(name):
    sde = get_sde(name)
    a = sde.prior_sampling((4000, 2, 2), generator=torch.Generator().manual_seed(3))
    b = sde.prior_sampling((4000, 2, 2), generator=torch.Generator().manual_seed(3))
    assert a.shape == (4000, 2, 2)
    assert torch.equal(a, b)
    expected_std = sde.sigma_max if name == "ve" else 1.0
    assert abs(float(a.std()) / expected_std - 1) < 0.03


@pytest.mark.parametrize("name", SDES)
def test_marginal_std_at_T_matches_prior(name):
    sde = get_sde(name)
    _, std = sde.marginal_prob(torch.zeros(1, 2), torch.ones(1))
    expected = sde.sigma_max if name == "ve" else 1.0
    assert abs(float(std[0]) - expected) / expected < 1e-3


def test_ve_smld_discretisation_telescopes_to_sigma_max():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
    t = torch.linspace(sde.T, 1e-3, sde.N)  # the PC sampler's grid: indices N-1 .. 0
    x = torch.zeros(sde.N, 3)
    f, G = sde.discretize(x, t)
    assert torch.all(f == 0)
    # sum_i (sigma_i^2 - sigma_{i-1}^2) with sigma_0 = 0 is sigma_N^2
    assert math.isclose(float((G.double() ** 2).sum()), 50.0**2, rel_tol=1e-5)


def test_vp_ddpm_discretisation():
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1.0, 0.5, 1e-3])
    f, G = sde.discretize(x, t)
    idx = (t * 999).long()
    beta = torch.linspace(0.1 / 1000, 20.0 / 1000, 1000)[idx]
    assert torch.allclose(f, (torch.sqrt(1 - beta)[:, None] - 1) * x, atol=1e-7)
    assert torch.allclose(G, torch.sqrt(beta))
    # the discrete chain's alpha_bar_N ~ e^{-sum beta_i - sum beta_i^2 / 2}, close to the continuous e^{-B(1)}
    ab = float(sde.alphas_cumprod[-1])
    assert math.isclose(ab, math.exp(-(0.1 + 0.5 * 19.9)), rel_tol=0.1)


@pytest.mark.parametrize("name", SDES)
def test_reverse_sde_and_probability_flow(name):
    sde = get_sde(name)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    score = lambda x, t: -x * 0.7  # any score
    f, g = sde.sde(x, t)
    rev = sde.reverse(score)
    d, gg = rev.sde(x, t)
    assert torch.allclose(d, f - g[:, None] ** 2 * score(x, t))
    assert torch.allclose(gg, g)
    ode = sde.reverse(score, probability_flow=True)
    d, gg = ode.sde(x, t)
    assert torch.allclose(d, f - 0.5 * g[:, None] ** 2 * score(x, t))
    assert torch.all(gg == 0)
    fd, Gd = sde.discretize(x, t)
    rf, rG = rev.discretize(x, t)
    assert torch.allclose(rf, fd - Gd[:, None] ** 2 * score(x, t))
    assert rev.N == sde.N and rev.T == sde.T


@pytest.mark.parametrize("name", SDES)
def test_noise_level_roundtrip(name):
    sde = get_sde(name)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    sigma = sde.noise_level(t)
    mean, std = sde.marginal_prob(torch.ones(4, 1, dtype=torch.float64), t)
    assert torch.allclose(sigma, std / mean[:, 0], rtol=1e-9)
    assert torch.allclose(sde.noise_level_to_t(sigma), t, rtol=1e-7, atol=1e-10)
    assert torch.all(torch.diff(sigma) > 0)


def test_get_sde_registry():
    assert isinstance(get_sde("ve"), sde_lib.VESDE)
    assert isinstance(get_sde("vp", beta_max=10.0), sde_lib.VPSDE)
    assert get_sde("subvp", N=10).N == 10
    assert get_sde("vp").T == 1
    with pytest.raises(ValueError):
        get_sde("nope")


# ----------------------------------------------------------------------------- closed-form coefficients
TS = torch.tensor([0.0, 1e-3, 0.1, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)


def _coefficients(sde, t):
    """Mean factor s(t) and std(t) of p_0t from marginal_prob; drift factor and g(t) from sde()."""
    ones = torch.ones(t.shape[0], 1, dtype=torch.float64)
    mean, std = sde.marginal_prob(ones, t)
    drift, g = sde.sde(ones, t)
    return mean[:, 0], std, drift[:, 0], g


@pytest.mark.parametrize("beta_min, beta_max", [(0.1, 20.0), (0.5, 5.0), (1.0, 1.0)])
def test_vp_coefficients_in_closed_form(beta_min, beta_max):
    sde = sde_lib.VPSDE(beta_min=beta_min, beta_max=beta_max)
    s, std, f, g = _coefficients(sde, TS)
    log_mean = -0.25 * TS**2 * (beta_max - beta_min) - 0.5 * TS * beta_min  # -B(t)/2
    beta = beta_min + TS * (beta_max - beta_min)
    assert torch.allclose(s, torch.exp(log_mean), rtol=1e-12, atol=0)
    assert torch.allclose(std, torch.sqrt(1 - torch.exp(2 * log_mean)), rtol=1e-10, atol=1e-15)
    assert torch.allclose(f, -0.5 * beta, rtol=1e-12) and torch.allclose(g, torch.sqrt(beta), rtol=1e-12)
    assert torch.allclose(sde.noise_level(TS), torch.sqrt(torch.exp(-2 * log_mean) - 1), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("beta_min, beta_max", [(0.1, 20.0), (0.5, 5.0)])
def test_subvp_coefficients_in_closed_form(beta_min, beta_max):
    sde = sde_lib.SubVPSDE(beta_min=beta_min, beta_max=beta_max)
    s, std, f, g = _coefficients(sde, TS)
    log_mean = -0.25 * TS**2 * (beta_max - beta_min) - 0.5 * TS * beta_min
    beta = beta_min + TS * (beta_max - beta_min)
    assert torch.allclose(s, torch.exp(log_mean), rtol=1e-12, atol=0)
    assert torch.allclose(std, 1 - torch.exp(2 * log_mean), rtol=1e-10, atol=1e-15)  # std, not variance
    assert torch.allclose(f, -0.5 * beta, rtol=1e-12)
    assert torch.allclose(g, torch.sqrt(beta * (1 - torch.exp(4 * log_mean))), rtol=1e-10, atol=1e-15)
    # sub-VP's variance is bounded by VP's at every t (Song et al., 2021, Sec. 3.4)
    _, vp_std, _, _ = _coefficients(sde_lib.VPSDE(beta_min=beta_min, beta_max=beta_max), TS)
    assert torch.all(std**2 <= vp_std**2 + 1e-15)


@pytest.mark.parametrize("sigma_min, sigma_max", [(0.01, 50.0), (0.002, 80.0), (0.1, 1.0)])
def test_ve_coefficients_in_closed_form(sigma_min, sigma_max):
    sde = sde_lib.VESDE(sigma_min=sigma_min, sigma_max=sigma_max)
    s, std, f, g = _coefficients(sde, TS)
    sigma = sigma_min * (sigma_max / sigma_min) ** TS
    assert torch.all(s == 1) and torch.all(f == 0)
    assert torch.allclose(std, sigma, rtol=1e-12)
    assert torch.allclose(g, sigma * math.sqrt(2 * math.log(sigma_max / sigma_min)), rtol=1e-12)
    expected = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), sde.N, dtype=torch.float64))
    assert torch.allclose(sde.discrete_sigmas.double(), expected, rtol=1e-6)  # stored as float32


@pytest.mark.parametrize("name", SDES)
def test_marginals_solve_the_moment_equations(name):
    """For dx = f(t) x dt + g(t) dw the kernel's mean factor and variance solve s' = f s and v' = 2 f v + g²
    (VE's std omits the constant -σ_min², which the derivative does not see)."""
    sde = get_sde(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    s_hi, std_hi, _, _ = _coefficients(sde, t + h)
    s_lo, std_lo, _, _ = _coefficients(sde, t - h)
    s, std, f, g = _coefficients(sde, t)
    ds = (s_hi - s_lo) / (2 * h)
    dv = (std_hi**2 - std_lo**2) / (2 * h)
    assert torch.allclose(ds, f * s, rtol=1e-6, atol=1e-9)
    assert torch.allclose(dv, 2 * f * std**2 + g**2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
def test_probability_flow_of_a_gaussian_keeps_the_marginal_variance(name):
    """Data N(0, s0² I): p_t = N(0, Σ(t) I), Σ = s(t)² s0² + std(t)², score -x/Σ. The probability-flow drift
    a(t) x must then satisfy Σ' = 2 a Σ, and the reverse SDE's drift a' x (run with dt < 0, noise g dw̄):
    Σ(t - δ) = Σ - 2 a' Σ δ + g² δ, i.e. Σ' = 2 a' Σ - g²."""
    sde = get_sde(name)
    s0 = 0.7
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6

    def sigma2(tt):
        s, std, _, _ = _coefficients(sde, tt)
        return s**2 * s0**2 + std**2

    var = sigma2(t)
    dvar = (sigma2(t + h) - sigma2(t - h)) / (2 * h)
    x = torch.ones(t.shape[0], 1, dtype=torch.float64)
    score = lambda x_, t_: -x_ / sigma2(t_)[:, None]  # noqa: E731
    a_ode = sde.reverse(score, probability_flow=True).sde(x, t)[0][:, 0]
    a_rev, g_rev = sde.reverse(score).sde(x, t)
    assert torch.allclose(dvar, 2 * a_ode * var, rtol=1e-6, atol=1e-9)
    assert torch.allclose(dvar, 2 * a_rev[:, 0] * var - g_rev**2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", SDES)
def test_prior_logp_in_closed_form(name):
    sde = get_sde(name)
    sigma = sde.sigma_max if name == "ve" else 1.0
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], dtype=torch.float64) * sigma
    sq = (z**2).sum(dim=1)
    expected = -1.5 * math.log(2 * math.pi * sigma**2) - sq / (2 * sigma**2)
    assert torch.allclose(sde.prior_logp(z), expected, rtol=1e-12)
    # and p_T is the marginal at T: VE's std reaches sigma_max, VP's mean factor e^{-B(1)/2} is ~4e-3
    s, std, _, _ = _coefficients(sde, torch.ones(1, dtype=torch.float64))
    assert math.isclose(float(std[0]), sigma, rel_tol=1e-2 if name != "ve" else 1e-12)
