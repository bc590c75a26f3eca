"""scoresde.losses: closed-form values, unbiasedness of SSM, and minimisers of the denoising losses."""

import math

import pytest
import torch

from scoresde import losses
from scoresde.sde import get_sde
from scoresde.toy import GaussianMixture

A = torch.tensor([[-1.2, 0.3, 0.0], [0.5, -0.7, 0.2], [0.1, 0.0, -2.0]], dtype=torch.float64)


def linear_score(x):
    return x @ A.T  # s(x) = A x


def data(n=400, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_score_matching_loss_linear_closed_form():
    x = data()
    expected = (0.5 * (x @ A.T).pow(2).sum(1)).mean() + torch.trace(A)
    assert torch.allclose(losses.score_matching_loss(linear_score, x), expected, atol=1e-10)


def test_score_matching_loss_image_shaped_input():
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = -0.3
    loss = losses.score_matching_loss(lambda y: c * y, x)
    expected = (0.5 * c**2 * x.pow(2).sum(dim=(1, 2, 3))).mean() + 4 * c
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize("variance_reduction", [False, True])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_sliced_score_matching_is_unbiased_for_exact_sm(variance_reduction, distribution):
    x = data(200)
    exact = losses.score_matching_loss(linear_score, x).detach()
    g = torch.Generator().manual_seed(2)
    est = torch.stack(
        [
            losses.sliced_score_matching_loss(
                linear_score, x, n_projections=50, variance_reduction=variance_reduction, generator=g, distribution=distribution
            )
            for _ in range(20)
        ]
    ).detach()
    # 1000 projections per point; the spread of the average is measured, not guessed
    se = float(est.std()) / math.sqrt(len(est))
    assert abs(float(est.mean() - exact)) < 5 * se + 1e-3
    assert abs(float(est.mean() - exact)) < 0.05 * abs(float(exact)) + 0.05


def test_sliced_score_matching_variance_reduction_has_lower_variance():
    x = data(100)
    g = torch.Generator().manual_seed(3)
    plain = torch.stack([losses.sliced_score_matching_loss(linear_score, x, generator=g) for _ in range(200)])
    vr = torch.stack([losses.sliced_score_matching_loss(linear_score, x, variance_reduction=True, generator=g) for _ in range(200)])
    assert float(vr.detach().var()) < float(plain.detach().var())


@pytest.mark.parametrize("loss_name", ["sm", "ssm", "ssm_vr"])
def test_score_matching_losses_train_and_find_the_gaussian_score(loss_name):
    # data N(0, diag(4, 0.25)) has score -diag(1/4, 4) x; a linear model trained on the loss finds it
    torch.manual_seed(0)  # only for the nn.Linear initialisation
    net = torch.nn.Linear(2, 2, bias=False).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(4)
    for _ in range(400):
        x = torch.randn(256, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5], dtype=torch.float64)
        if loss_name == "sm":
            loss = losses.score_matching_loss(net, x)
        else:
            loss = losses.sliced_score_matching_loss(net, x, n_projections=2, variance_reduction=loss_name == "ssm_vr", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(net.weight.detach(), torch.diag(torch.tensor([-0.25, -4.0], dtype=torch.float64)), atol=0.25)


def test_dsm_loss_is_lowest_at_the_true_perturbed_score():
    mix = GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)
    x = mix.sample(4000, generator=torch.Generator().manual_seed(5))
    sigmas = torch.exp(torch.linspace(math.log(20.0), 0.0, 10))
    true = mix.ncsn_score()
    wrong = [lambda y, s: 1.1 * true(y, s), lambda y, s: true(y, s) + 0.05 / s[:, None], lambda y, s: 0.9 * true(y, s)]
    l_true = losses.dsm_loss(true, x, sigmas, generator=torch.Generator().manual_seed(6))
    for w in wrong:
        l_w = losses.dsm_loss(w, x, sigmas, generator=torch.Generator().manual_seed(6))  # same noise
        assert float(l_true) < float(l_w)
    # with lambda = sigma^2 every level has the same scale: E = D/2 minus the (small) denoising gain
    assert 0.0 < float(l_true) < 1.0


def test_dsm_loss_weighting_and_closed_form():
    # point mass at 0 perturbed by sigma: true score -x/sigma^2 makes sigma s + z = 0 exactly
    x = torch.zeros(64, 2)
    sigmas = [2.0, 0.5]
    true = lambda y, s: -y / s[:, None] ** 2
    assert float(losses.dsm_loss(true, x, sigmas, generator=torch.Generator().manual_seed(0))) < 1e-10
    # zero score: 1/2 ||z||^2 sigma^(p - 2); p = 2 gives E = D/2 = 1, independent of sigma
    zero = lambda y, s: torch.zeros_like(y)
    g = torch.Generator().manual_seed(1)
    big = torch.zeros(20000, 2)
    assert abs(float(losses.dsm_loss(zero, big, sigmas, anneal_power=2.0, generator=g)) - 1.0) < 0.03
    # p = 0 weights by sigma^-2: E = 1/2 * D * mean(sigma^-2) = mean(1/4, 4) = 2.125
    assert abs(float(losses.dsm_loss(zero, big, sigmas, anneal_power=0.0, generator=g)) - 2.125) < 0.1


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_sde_dsm_loss_is_lowest_at_the_true_score(name, likelihood_weighting):
    sde = get_sde(name)
    mix = GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)
    x = mix.sample(4000, generator=torch.Generator().manual_seed(7))
    true = mix.sde_score(sde)
    l_true = losses.sde_dsm_loss(sde, true, x, likelihood_weighting, generator=torch.Generator().manual_seed(8))
    for w in [lambda y, t: 1.1 * true(y, t), lambda y, t: 0.9 * true(y, t)]:
        l_w = losses.sde_dsm_loss(sde, w, x, likelihood_weighting, generator=torch.Generator().manual_seed(8))
        assert float(l_true) < float(l_w)
    assert torch.isfinite(l_true) and l_true.ndim == 0


def test_sde_dsm_loss_zero_for_point_mass():
    sde = get_sde("vp")
    x = torch.zeros(32, 1, 2, 2)

    def true(y, t):
        _, std = sde.marginal_prob(y, t)
        return -y / std[:, None, None, None] ** 2  # p_t = N(0, std^2 I)

    assert float(losses.sde_dsm_loss(sde, true, x, generator=torch.Generator().manual_seed(0))) < 1e-8


def test_ddpm_loss_true_eps_predictor():
    # data N(0, I): x_i = sqrt(ab) x + sqrt(1 - ab) eps ~ N(0, I), E[eps | x_i] = sqrt(1 - ab) x_i,
    # residual variance per dim = ab, so E[loss] = D * mean_i(ab_i).
    sde = get_sde("vp", N=1000)
    betas = sde.discrete_betas
    ab = torch.cumprod(1 - betas.double(), 0)
    seen = {}

    def eps_true(xi, i):
        seen["dtype"], seen["shape"] = i.dtype, i.shape
        return torch.sqrt(1 - ab[i]).to(xi)[:, None] * xi

    x = torch.randn(40000, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    l_true = losses.ddpm_loss(eps_true, x, betas, generator=torch.Generator().manual_seed(10))
    assert seen["dtype"] == torch.long and seen["shape"] == (40000,)
    assert abs(float(l_true) - 2 * float(ab.mean())) < 0.03
    l_wrong = losses.ddpm_loss(lambda xi, i: 0.8 * eps_true(xi, i), x, betas, generator=torch.Generator().manual_seed(10))
    assert float(l_true) < float(l_wrong)
