"""scoresde.metrics: sliced Wasserstein, mode weights, Frechet distance, feature statistics."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from scoresde.metrics import feature_statistics, frechet_distance, mode_weight_error, sliced_wasserstein
from scoresde.toy import GaussianMixture


def test_sliced_wasserstein_zero_for_identical_and_duplicated_samples():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x) == 0.0
    # x and x repeated twice are the same empirical measure (unequal sizes use the quantile merge)
    assert sliced_wasserstein(x, torch.cat([x, x]), generator=torch.Generator().manual_seed(1)) < 1e-12


def test_sliced_wasserstein_of_a_translation():
    # W1(theta.x, theta.(x + c)) = |theta.c|; in 2-D E|cos| = 2/pi
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([3.0, 4.0])
    sw = sliced_wasserstein(x, x + c, n_projections=4096, generator=torch.Generator().manual_seed(3))
    assert math.isclose(sw, 5.0 * 2 / math.pi, rel_tol=0.03)


def test_sliced_wasserstein_one_dimensional_matches_scipy_for_unequal_sizes():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(137, 1, generator=g)
    b = torch.randn(61, 1, generator=g) * 2 + 0.5
    # in 1-D every direction is +-1, so the sliced distance is the exact W1
    expected = stats.wasserstein_distance(a[:, 0].numpy(), b[:, 0].numpy())
    assert math.isclose(sliced_wasserstein(a, b, n_projections=8), expected, rel_tol=1e-9)


def test_sliced_wasserstein_reproducible_and_image_shaped():
    x = torch.rand(50, 1, 3, 3, generator=torch.Generator().manual_seed(5))
    y = torch.rand(70, 1, 3, 3, generator=torch.Generator().manual_seed(6))
    a = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(7))
    b = sliced_wasserstein(x, y, generator=torch.Generator().manual_seed(7))
    assert a == b and a > 0


def test_mode_weight_error():
    mix = GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)
    x = mix.sample(20000, generator=torch.Generator().manual_seed(8))
    assert mode_weight_error(x, mix) < 0.01
    all_in_one = torch.full((100, 2), 5.0)
    assert math.isclose(mode_weight_error(all_in_one, mix), 0.2, abs_tol=1e-6)


def test_feature_statistics_float64():
    f = torch.randn(200, 4, generator=torch.Generator().manual_seed(9))
    mu, sigma = feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (4,) and sigma.shape == (4, 4)
    assert np.allclose(mu, f.double().mean(0).numpy())
    assert np.allclose(sigma, np.cov(f.double().numpy(), rowvar=False))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 5))
    mu, sigma = feature_statistics(a)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    m1, m2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert math.isclose(frechet_distance(m1, np.diag(s1), m2, np.diag(s2)), expected, rel_tol=1e-9)


def test_frechet_distance_singular_covariances():
    # rank-deficient covariances (fewer samples than dimensions) must still give a finite, real value
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0
    d = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
