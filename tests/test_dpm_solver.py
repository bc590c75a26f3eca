"""scoresde.dpm_solver: DPM-Solver++(2M) (Lu et al., 2022, Alg. 2) against the exact probability-flow ODE.

For data N(μ, s² I) every SDE's marginal is x_t ~ N(α_t μ, (α_t² s² + σ_t²) I), so the exact score is
-(x - α_t μ) / (α_t² s² + σ_t²), and the probability-flow ODE keeps the standardised coordinate
(x_t - α_t μ) / √(α_t² s² + σ_t²) constant: its solution from T to ε is the affine map

    x_ε = α_ε μ + √(α_ε² s² + σ_ε²) / √(α_T² s² + σ_T²) · (x_T - α_T μ).

Measured (float64, μ = 0.5, s = 0.25, 500×4 points, RMS error at t = ε): 20 steps: VE 2.6e-3, VP 3.2e-3,
sub-VP 6.3e-3, against Euler in t at the same 20 NFE 2.0e-1 / 2.7e-2 / 4.0e-2; error ratios 20→40 steps
3.75 / 3.66 / 3.37 and 40→80 steps 3.95 / 3.93 / 3.86 (second order: 4).
"""

import math

import pytest
import torch

from scoresde import sampling
from scoresde.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from scoresde.metrics import mode_weight_error
from scoresde.sde import bcast, get_sde
from scoresde.toy import GaussianMixture

MU, S = 0.5, 0.25


def _alpha_sigma(sde, t):
    one = torch.ones(t.shape[0], 1, dtype=t.dtype)
    mean, std = sde.marginal_prob(one, t)
    return mean[:, 0], std


def gaussian_score(sde, mu=MU, s=S):
    def score(x, t):
        a, sg = _alpha_sigma(sde, t.to(torch.float64))
        return (-(x - bcast(a, x) * mu) / bcast(a**2 * s**2 + sg**2, x)).to(x.dtype)
    return score


def exact_endpoint(sde, x_T, eps, mu=MU, s=S):
    a, sg = _alpha_sigma(sde, torch.tensor([sde.T, eps], dtype=torch.float64))
    return a[1] * mu + torch.sqrt(a[1] ** 2 * s**2 + sg[1] ** 2) / torch.sqrt(a[0] ** 2 * s**2 + sg[0] ** 2) * (x_T - a[0] * mu)


def euler_pf_ode(sde, score, x_T, steps, eps):
    """Plain Euler in t on dx/dt = f - g²s/2, uniform steps T -> eps: ``steps`` score evaluations."""
    ts = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64)
    rsde = sde.reverse(score, probability_flow=True)
    x = x_T.clone()
    for i in range(steps):
        x = x + rsde.sde(x, ts[i].expand(x.shape[0]))[0] * float(ts[i + 1] - ts[i])
    return x


def _setup(name):
    sde = get_sde(name)
    x_T = sde.prior_sampling((500, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sde, gaussian_score(sde), x_T, exact_endpoint(sde, x_T, 1e-3)


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_dpm_solver_reaches_the_exact_pf_ode_endpoint_far_better_than_euler(name):
    sde, score, x_T, exact = _setup(name)
    x, nfe = dpm_solver_pp_2m(sde, score, x_T.shape, steps=20, x_init=x_T)
    assert nfe == 20
    err = _rms(x, exact)
    err_euler = _rms(euler_pf_ode(sde, score, x_T, 20, 1e-3), exact)
    assert err < 0.03 * S  # measured 0.010 (VE), 0.013 (VP), 0.025 (sub-VP) of the data std
    assert err < err_euler / 4  # measured 78x (VE), 8x (VP), 6x (sub-VP) at equal NFE


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_dpm_solver_error_is_second_order(name):
    sde, score, x_T, exact = _setup(name)
    err = {n: _rms(dpm_solver_pp_2m(sde, score, x_T.shape, steps=n, x_init=x_T)[0], exact) for n in (20, 40, 80)}
    # Doubling the steps divides the error by ~4 (measured 3.37-3.75 for 20 -> 40, 3.86-3.95 for 40 -> 80).
    assert err[20] / err[40] > 3.0
    assert err[40] / err[80] > 3.5


def test_one_step_is_the_first_order_ddim_update():
    # DPM-Solver++1 (= DDIM): x_1 = (σ_1/σ_0) x_0 - α_1 (e^{-h} - 1) x_θ(x_0, T), with x_θ = (x + σ_0² s) / α_0.
    sde, score, x_T, _ = _setup("vp")
    ts = torch.tensor([sde.T, 1e-3], dtype=torch.float64)
    a, sg = _alpha_sigma(sde, ts)
    h = float(torch.log(a[1] / sg[1]) - torch.log(a[0] / sg[0]))
    x0_pred = (x_T + sg[0] ** 2 * score(x_T, ts[:1].expand(x_T.shape[0]))) / a[0]
    expected = sg[1] / sg[0] * x_T - a[1] * math.expm1(-h) * x0_pred
    x, nfe = dpm_solver_pp_2m(sde, score, x_T.shape, steps=1, x_init=x_T)
    assert nfe == 1 and torch.allclose(x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_logsnr_timesteps_are_uniform_in_lambda(name):
    sde = get_sde(name)
    ts = dpm_solver_timesteps(sde, 12, 1e-3)
    assert ts.shape == (13,) and float(ts[0]) == sde.T and float(ts[-1]) == 1e-3 and torch.all(torch.diff(ts) < 0)
    a, sg = _alpha_sigma(sde, ts)
    lam = torch.log(a / sg)
    assert torch.allclose(torch.diff(lam), torch.diff(lam)[:1].expand(12), rtol=1e-9)
    assert torch.allclose(dpm_solver_timesteps(sde, 4, 1e-3, "time_uniform"),
                          torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    with pytest.raises(ValueError):
        dpm_solver_timesteps(sde, 4, 1e-3, "quadratic")


def test_lower_order_final_only_changes_the_last_of_few_steps():
    sde, score, x_T, exact = _setup("ve")
    lo, _ = dpm_solver_pp_2m(sde, score, x_T.shape, steps=6, x_init=x_T)
    hi, _ = dpm_solver_pp_2m(sde, score, x_T.shape, steps=6, x_init=x_T, lower_order_final=False)
    assert not torch.equal(lo, hi)
    a, _ = dpm_solver_pp_2m(sde, score, x_T.shape, steps=12, x_init=x_T)
    b, _ = dpm_solver_pp_2m(sde, score, x_T.shape, steps=12, x_init=x_T, lower_order_final=False)
    assert torch.equal(a, b)  # 10 steps or more: every step after the first is second order


def test_dpm_solver_through_the_sampler_registry():
    sde = get_sde("vp", N=50)
    s = sampling.get_sampler("dpm_solver", sde=sde, steps=10)
    assert s.conditioning == "time" and set(sampling.sampler_settings("dpm_solver")) >= {"sde", "steps", "eps"}
    calls = []

    def score(x, t):
        calls.append(1)
        return gaussian_score(sde)(x, t)

    x, nfe = s(score, (64, 3), generator=torch.Generator().manual_seed(0))
    assert x.shape == (64, 3) and torch.isfinite(x).all() and nfe == len(calls) == 10
    again, _ = s(score, (64, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # the only randomness, x_T ~ p_T, comes from the generator


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_dpm_solver_recovers_fig1_mode_weights_with_exact_scores(name):
    mix = GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)
    sde = get_sde(name, sigma_max=100.0) if name == "ve" else get_sde(name)
    x, nfe = sampling.get_sampler("dpm_solver", sde=sde, steps=25)(mix.sde_score(sde), (4000, 2),
                                                                    generator=torch.Generator().manual_seed(10))
    assert nfe == 25 and torch.isfinite(x).all()
    assert mode_weight_error(x, mix) <= 0.03  # measured 0.020 (VE), 0.018 (VP)
    nearest = torch.cdist(x, mix.means).argmin(dim=1)
    for k in range(2):
        assert abs(float((x[nearest == k] - mix.means[k]).std()) - 1.0) < 0.1  # measured 1.01-1.06
