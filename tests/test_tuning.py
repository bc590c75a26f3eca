"""NCSNv2's techniques 2 and 4 (scoresde.tuning) and their ``auto`` params (noise.num_levels, sample.*.step_lr)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipeline.params import ParamsError
from scoresde.tuning import ncsnv2_gamma, ncsnv2_num_levels, ncsnv2_step_lr

# NCSNv2's CIFAR-10 config (Song & Ermon 2020): sigma_begin 50, sigma_end 0.01, num_classes 232,
# n_steps_each 5, step_lr 6.2e-6 in their x + a s + sqrt(2a) z convention (= 2 x 6.2e-6 here).
CIFAR_D, CIFAR_S1, CIFAR_SL, CIFAR_T = 3072, 50.0, 0.01, 5
NCSNV2_L, NCSNV2_STEP = 232, 2 * 6.2e-6


def _geometric(s1: float, sl: float, levels: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(s1), math.log(sl), levels))


def _eq4(eps: float, sigmas, T: int) -> float:
    """NCSNv2 Eq. (4) as printed, in their step convention (eps_v2 = ours / 2)."""
    sl2 = float(sigmas[-1]) ** 2
    gamma = float(sigmas[-2]) / float(sigmas[-1])
    r = 1 - eps / sl2
    fixed = 2 * eps / (sl2 - sl2 * r ** 2)
    return r ** (2 * T) * (gamma ** 2 - fixed) + fixed


# ------------------------------------------------------------------------------------- CIFAR-10 figures
def test_cifar10_num_levels_near_ncsnv2():
    L = ncsnv2_num_levels(CIFAR_D, CIFAR_S1, CIFAR_SL)
    assert abs(L - NCSNV2_L) / NCSNV2_L <= 0.10, L  # measured: 220
    ratio = (CIFAR_S1 / CIFAR_SL) ** (1 / (L - 1))
    assert ratio <= ncsnv2_gamma(CIFAR_D)
    assert (CIFAR_S1 / CIFAR_SL) ** (1 / (L - 2)) > ncsnv2_gamma(CIFAR_D)  # one level fewer would exceed γ


@pytest.mark.parametrize("levels", [NCSNV2_L, "auto"])
def test_cifar10_step_near_ncsnv2(levels):
    L = ncsnv2_num_levels(CIFAR_D, CIFAR_S1, CIFAR_SL) if levels == "auto" else levels
    sigmas = _geometric(CIFAR_S1, CIFAR_SL, L)
    eps = ncsnv2_step_lr(sigmas, CIFAR_T)
    # measured: 1.2368e-5 on NCSNv2's 232 levels (-0.3 %), 1.2928e-5 on the 220 auto levels (+4.3 %)
    assert abs(eps - NCSNV2_STEP) / NCSNV2_STEP <= 0.05, eps
    # the optimum of |Eq. (4) - 1| in NCSNv2's convention (eps / 2): no grid point does better
    best = abs(_eq4(eps / 2, sigmas, CIFAR_T) - 1)
    grid = np.linspace(1e-3, 0.999, 5000) * CIFAR_SL ** 2
    assert best <= min(abs(_eq4(e, sigmas, CIFAR_T) - 1) for e in grid) + 1e-12


def test_gamma_solves_technique_2():
    for dim in (5, 10, 784, CIFAR_D, 12288, 3 * 64 * 64):
        g = ncsnv2_gamma(dim)
        a = math.sqrt(2 * dim) * (g - 1)
        assert g > 1
        assert abs(norm.cdf(a + 3 * g) - norm.cdf(a - 3 * g) - 0.5) < 1e-8


# ------------------------------------------------------------------------------------------ monotonicity
def test_monotone_where_theory_says():
    dims = [5, 8, 64, 784, 3072, 12288, 196608]
    gammas = [ncsnv2_gamma(d) for d in dims]
    assert all(a > b for a, b in zip(gammas, gammas[1:])) and gammas[-1] < 1.01  # decreases towards 1
    levels_d = [ncsnv2_num_levels(d, 50.0, 0.01) for d in dims]
    assert all(a < b for a, b in zip(levels_d, levels_d[1:]))
    levels_r = [ncsnv2_num_levels(CIFAR_D, 50.0, sl) for sl in (1.0, 0.1, 0.01, 0.001)]
    assert all(a < b for a, b in zip(levels_r, levels_r[1:]))
    steps = [ncsnv2_step_lr(_geometric(50.0, sl, NCSNV2_L), CIFAR_T) for sl in (0.1, 0.01, 0.001, 1e-4)]
    assert all(a > b for a, b in zip(steps, steps[1:]))
    fixed_ratio = [ncsnv2_step_lr([1.04 * sl, sl], CIFAR_T) for sl in (0.1, 0.01, 0.001)]
    assert np.allclose(np.array(fixed_ratio) / np.array([0.1, 0.01, 0.001]) ** 2, fixed_ratio[0] / 0.01)  # ∝ σ_L²


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, name", [
    (lambda: ncsnv2_gamma(0), "dim"),
    (lambda: ncsnv2_gamma(-3), "dim"),
    (lambda: ncsnv2_gamma(2), "dim"),  # no root for D <= 4
    (lambda: ncsnv2_num_levels(0, 50.0, 0.01), "dim"),
    (lambda: ncsnv2_num_levels(CIFAR_D, 0.01, 0.01), "sigma_end"),
    (lambda: ncsnv2_num_levels(CIFAR_D, 0.01, 50.0), "sigma_end"),
    (lambda: ncsnv2_step_lr(_geometric(50.0, 0.01, 10), 0), "n_steps_each"),
    (lambda: ncsnv2_step_lr([1.0], 5), "sigmas"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ------------------------------------------------------------------------------------------- params
NOISE = {"sigma_begin": "auto", "sigma_end": 0.01, "num_levels": "auto", "n_examples": 2,
         "ve": {"sigma_min": 0.01, "sigma_max": "auto"},
         "vp": {"beta_min": 0.1, "beta_max": 20.0}, "subvp": {"beta_min": 0.1, "beta_max": 20.0}}


def test_build_schedule_num_levels_auto():
    from pipeline.schedule import NOISE as NOISE_SCHEMA, build_schedule
    from scoresde.noise import sigma_begin_from_data

    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = NOISE_SCHEMA.validate(NOISE, "noise")
    schedule = build_schedule(p, x)
    sigma_begin = sigma_begin_from_data(x)
    L = ncsnv2_num_levels(16, sigma_begin, 0.01)
    assert schedule["num_levels"] == L == len(schedule["sigmas"])
    assert schedule["num_levels_source"] == "ncsnv2"
    assert schedule["ncsnv2_gamma"] == ncsnv2_gamma(16)
    assert schedule["sigmas"][0] / schedule["sigmas"][1] <= schedule["ncsnv2_gamma"] * (1 + 1e-12)

    explicit = build_schedule({**p, "num_levels": 7}, x)
    assert explicit["num_levels"] == 7 and explicit["num_levels_source"] == "params"
    assert set(explicit) == {"sigma_begin", "sigma_begin_source", "sigma_end", "num_levels", "num_levels_source",
                             "sigmas", "ve", "vp", "subvp", "edm", "data_shape"}


def test_build_schedule_num_levels_auto_low_dim_names_field():
    from pipeline.schedule import NOISE as NOISE_SCHEMA, build_schedule

    p = NOISE_SCHEMA.validate({**NOISE, "sigma_begin": 5.0}, "noise")
    with pytest.raises(ParamsError, match="noise.num_levels"):
        build_schedule(p, torch.zeros(8, 2))  # 2-D toy data: technique 2 has no root


def test_step_lr_auto_validates_and_resolves():
    from pipeline.generation import resolve_step_lr
    from pipeline.schemas import sample_section

    cfg = sample_section("ncsn").validate(
        {"sampler": "annealed_langevin", "n": 4, "batch_size": 4, "n_steps_each": 5, "step_lr": "auto"}, "sample.ncsn")
    assert cfg["step_lr"] == "auto"
    schedule = {"sigmas": [float(s) for s in _geometric(50.0, 0.01, 20)]}
    assert resolve_step_lr(cfg, schedule) == ncsnv2_step_lr(schedule["sigmas"], 5)
    assert resolve_step_lr({**cfg, "step_lr": 4e-5}, schedule) == 4e-5
    default = sample_section("ncsn").validate({"sampler": "annealed_langevin", "n": 4, "batch_size": 4}, "sample.ncsn")
    assert default["step_lr"] == 4e-5


def test_build_sampler_uses_resolved_step_lr():
    from pipeline.generation import build_sampler, resolve_step_lr

    cfg = {"sampler": "annealed_langevin", "n": 4, "batch_size": 4, "n_steps_each": 5, "step_lr": "auto",
           "denoise": True}
    schedule = {"sigmas": [float(s) for s in _geometric(5.0, 0.01, 12)]}
    sampler = build_sampler("ncsn", cfg, schedule, torch.device("cpu"))
    assert sampler.settings["step_lr"] == resolve_step_lr(cfg, schedule)


def test_num_levels_one_and_step_lr_zero_still_fail():
    from pipeline.schedule import NOISE as NOISE_SCHEMA
    from pipeline.schemas import sample_section

    with pytest.raises(ParamsError, match="noise.num_levels"):
        NOISE_SCHEMA.validate({**NOISE, "num_levels": 1}, "noise")
    with pytest.raises(ParamsError, match="sample.ncsn.step_lr"):
        sample_section("ncsn").validate(
            {"sampler": "annealed_langevin", "n": 4, "batch_size": 4, "step_lr": 0}, "sample.ncsn")
