"""scoresde.likelihood: probability-flow log-likelihood of Gaussian data against the analytic density."""

import math

import pytest
import torch

from scoresde.likelihood import bits_per_dim, log_likelihood
from scoresde.sde import get_sde

MU = torch.tensor([1.0, -0.5, 0.3])
SD = torch.tensor([0.8, 1.3, 0.5])  # anisotropic, so the divergence is not a multiple of the identity


def gaussian_score(sde):
    """Exact score of p_t when p_0 = N(MU, diag(SD^2)): p_t = N(s MU, diag(s^2 SD^2 + std^2))."""

    def score_fn(x, t):
        mean, std = sde.marginal_prob(torch.ones(x.shape[0], 1, dtype=x.dtype), t)
        s = mean  # (B, 1)
        var = s**2 * SD.to(x) ** 2 + std[:, None] ** 2
        return -(x - s * MU.to(x)) / var

    return score_fn


def analytic_logp(x):
    return torch.distributions.Normal(MU.double(), SD.double()).log_prob(x.double()).sum(dim=1)


def data(n, seed):
    return MU + SD * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("trace", ["exact", "hutchinson-rademacher"])
def test_log_likelihood_of_gaussian_data_per_sample(name, trace):
    # For a diagonal Jacobian the Rademacher probe is exact too (v_i^2 = 1), so both are per-sample checks.
    sde = get_sde(name)
    x = data(64, 0)
    logp, nfe = log_likelihood(sde, gaussian_score(sde), x, trace=trace, generator=torch.Generator().manual_seed(1))
    assert logp.shape == (64,) and nfe > 0
    err = (logp.double() - analytic_logp(x)).abs().max() / 3  # nats per dimension
    assert float(err) < 0.05


def test_log_likelihood_gaussian_probe_is_unbiased():
    sde = get_sde("vp")
    x = data(1024, 2)
    logp, _ = log_likelihood(sde, gaussian_score(sde), x, trace="hutchinson-gaussian", generator=torch.Generator().manual_seed(3))
    diff = logp.double() - analytic_logp(x)
    assert abs(float(diff.mean())) / 3 < 0.05  # unbiased on average
    assert float(diff.abs().max()) > 1e-3  # but noisy per sample (it is a stochastic estimate)


def test_log_likelihood_image_shaped_input_and_reproducible():
    sde = get_sde("vp")
    x = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    std0 = 1.0

    def score_fn(y, t):  # p_0 = N(0, I) stays N(0, I) under VP
        return -y / std0**2

    a, _ = log_likelihood(sde, score_fn, x, generator=torch.Generator().manual_seed(5))
    b, _ = log_likelihood(sde, score_fn, x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).reshape(4, -1).sum(1)
    assert torch.allclose(a, expected, atol=0.05 * 4)


def test_log_likelihood_rejects_unknown_trace():
    with pytest.raises(ValueError):
        log_likelihood(get_sde("vp"), lambda x, t: -x, torch.zeros(2, 2), trace="nope")


def test_bits_per_dim():
    # a uniform density on [0, 1]^D (logp = 0) over 256 bins is exactly 8 bits per dimension
    logp = torch.zeros(3)
    assert torch.allclose(bits_per_dim(logp, (3, 1, 4, 4)), torch.full((3,), 8.0))
    # data scaled to [-1, 1]: density 2^-D for the uniform, and the offset drops to 7 bits
    d = 16
    assert torch.allclose(bits_per_dim(torch.full((3,), -d * math.log(2)), (3, 1, 4, 4), data_range=2.0), torch.full((3,), 8.0))
    # nats -> bits per dimension
    assert torch.allclose(bits_per_dim(torch.tensor([-2 * math.log(2)]), (1, 2), bins=2), torch.tensor([2.0]))
