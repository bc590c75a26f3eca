"""scoresde.noise: geometric levels and the NCSNv2 sigma_1 rule."""

import math

import pytest
import torch

from scoresde.noise import geometric_sigmas, sigma_begin_from_data


def test_geometric_sigmas_are_descending_geometric_float64():
    s = geometric_sigmas(50.0, 0.01, 10)
    assert s.dtype == torch.float64
    assert s.shape == (10,)
    assert float(s[0]) == 50.0 and float(s[-1]) == 0.01
    assert torch.all(torch.diff(s) < 0)
    ratios = s[:-1] / s[1:]
    assert torch.allclose(ratios, torch.full_like(ratios, (50.0 / 0.01) ** (1 / 9)), rtol=1e-12)


def test_geometric_sigmas_match_ncsn_toy_levels():
    # NCSN's toy experiment: np.exp(np.linspace(np.log(20), 0., 10))
    s = geometric_sigmas(20.0, 1.0, 10)
    expected = torch.exp(torch.linspace(math.log(20.0), 0.0, 10, dtype=torch.float64))
    assert torch.allclose(s, expected, rtol=1e-14)


def test_geometric_sigmas_edge_cases():
    assert geometric_sigmas(3.0, 3.0, 1).tolist() == [3.0]
    with pytest.raises(ValueError):
        geometric_sigmas(0.01, 1.0, 5)  # ascending
    with pytest.raises(ValueError):
        geometric_sigmas(1.0, 0.0, 5)
    with pytest.raises(ValueError):
        geometric_sigmas(1.0, 0.1, 0)


@pytest.mark.parametrize("chunk_elements", [1, 37, 1 << 24])
def test_sigma_begin_from_data_is_the_max_pairwise_distance(chunk_elements):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, 4, 4, generator=g) * 3
    flat = x.reshape(300, -1).double()
    brute = float(torch.cdist(flat, flat).max())
    got = sigma_begin_from_data(x, chunk_elements=chunk_elements)
    assert math.isclose(got, brute, rel_tol=1e-9)


def test_sigma_begin_from_data_small_inputs():
    assert sigma_begin_from_data(torch.zeros(1, 3)) == 0.0
    assert math.isclose(sigma_begin_from_data(torch.tensor([[0.0, 0.0], [3.0, 4.0]])), 5.0)


def test_sigma_begin_from_data_memory_bound():
    # A wide dataset with a chunk budget far below N^2: only ever holds chunk_elements distances.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 64, generator=g)
    x[17] += 40.0  # an outlier fixes the answer
    got = sigma_begin_from_data(x, chunk_elements=3000 * 8)
    d = torch.linalg.vector_norm(x.double() - x[17].double(), dim=1).max()
    assert math.isclose(got, float(d), rel_tol=1e-9)
