"""scoresde.toy: the Gaussian mixture's density, score and derived marginals in closed form."""

import math

import pytest
import torch

from scoresde.sde import get_sde
from scoresde.toy import GaussianMixture


def fig1():
    return GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)


def test_log_prob_matches_manual_formula():
    mix = GaussianMixture([3.0, 1.0], [(1.0, 0.0), (-2.0, 1.0)], 0.7)  # weights get normalised
    assert torch.allclose(mix.weights, torch.tensor([0.75, 0.25]))
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    comps = [torch.distributions.MultivariateNormal(torch.tensor(m, dtype=torch.float64), 0.49 * torch.eye(2, dtype=torch.float64))
             for m in [(1.0, 0.0), (-2.0, 1.0)]]
    expected = torch.log(0.75 * comps[0].log_prob(x).exp() + 0.25 * comps[1].log_prob(x).exp())
    assert torch.allclose(mix.log_prob(x), expected, atol=1e-10)


def test_score_is_the_gradient_of_log_prob():
    mix = fig1()
    x = (torch.rand(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 0.5) * 20
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(xr).sum(), xr)
    assert torch.allclose(mix.score(x), grad, atol=1e-9)


def test_sample_weights_labels_and_generator():
    mix = fig1()
    x, labels = mix.sample(20000, generator=torch.Generator().manual_seed(2), return_labels=True)
    y = mix.sample(20000, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x, y)
    assert x.shape == (20000, 2)
    assert abs(float((labels == 0).float().mean()) - 0.8) < 0.01
    assert torch.allclose(mix.mode_weights(x), torch.tensor([0.8, 0.2]), atol=0.01)
    resid = x - mix.means[labels]
    assert abs(float(resid.std()) - 1.0) < 0.02


def test_perturb_is_the_convolution_with_gaussian_noise():
    mix = fig1()
    p = mix.perturb(2.0)
    assert math.isclose(p.std, math.sqrt(5.0))
    assert torch.equal(p.means, mix.means) and torch.equal(p.weights, mix.weights)
    # Monte Carlo: p_sigma(x) = E_{x0 ~ p}[N(x; x0, sigma^2 I)]
    x = torch.tensor([[4.0, 3.0], [2.0, 2.5], [-6.0, -4.0]], dtype=torch.float64)
    x0 = mix.sample(200000, generator=torch.Generator().manual_seed(3)).double()
    kernel = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    mc = torch.stack([kernel.log_prob(xi - x0).sum(dim=1).exp().mean() for xi in x])
    assert torch.allclose(mc.log(), p.log_prob(x), atol=0.02)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_marginal_and_sde_score(name):
    sde = get_sde(name)
    mix = fig1()
    t = 0.3
    m = mix.marginal(sde, t)
    mean, std_t = sde.marginal_prob(torch.ones(1, 1, dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
    s, sd = float(mean), float(std_t)
    assert torch.allclose(m.means, mix.means * s)
    assert math.isclose(m.std, math.sqrt(s**2 + sd**2), rel_tol=1e-6)
    # simulated x(t) = s x0 + sd z has the marginal's moments
    x0 = mix.sample(40000, generator=torch.Generator().manual_seed(4))
    xt = s * x0 + sd * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(m.mode_weights(xt), mix.weights, atol=0.01)
    # the per-sample score function agrees with the scalar marginal (and with per-sample t)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(6)) * 4
    sf = mix.sde_score(sde)
    assert torch.allclose(sf(x, torch.full((64,), t)), m.score(x), atol=1e-4, rtol=1e-4)
    tt = torch.linspace(0.05, 1.0, 64)
    rows = torch.stack([mix.marginal(sde, float(tt[i])).score(x[i : i + 1])[0] for i in range(64)])
    assert torch.allclose(sf(x, tt), rows, atol=1e-4, rtol=1e-4)


def test_ncsn_score_is_the_perturbed_score():
    mix = fig1()
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(7)) * 6
    sig = torch.linspace(0.1, 20.0, 32)
    sf = mix.ncsn_score()
    rows = torch.stack([mix.perturb(float(sig[i])).score(x[i : i + 1])[0] for i in range(32)])
    assert torch.allclose(sf(x, sig), rows, atol=1e-5, rtol=1e-5)


def test_mode_weights_nearest_mean():
    mix = fig1()
    x = torch.tensor([[4.0, 4.0], [1.0, 0.5], [-0.5, -1.0], [-9.0, -9.0]])
    assert mix.mode_weights(x).tolist() == [0.5, 0.5]
