"""scoresde.sampling with exact scores of the article's Fig. 1 mixture.

Fig. 1 finding (Song & Ermon, 2019, Sec. 3.2.2 / NCSN's toy runner): Langevin dynamics with the exact data score
mixes between the two modes far too slowly and leaves their weights near the split of the initial points,
while annealed Langevin dynamics recovers 0.8 / 0.2. The SDE samplers, fed the exact marginal scores
``GaussianMixture.marginal(sde, t)``, recover the weights too.
"""

import math

import pytest
import torch

from pipeline import claims
from scoresde import pc, sampling
from scoresde.metrics import mode_weight_error
from scoresde.noise import geometric_sigmas
from scoresde.sde import get_sde
from scoresde.toy import GaussianMixture


def fig1():
    return GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)


def uniform_start(n, generator):
    return torch.rand(n, 2, generator=generator) * 16.0 - 8.0  # Uniform[-8, 8]^2


def per_mode_std(x, mix):
    nearest = torch.cdist(x, mix.means).argmin(dim=1)
    return [float((x[nearest == k] - mix.means[k]).std()) for k in range(2)]


# ------------------------------------------------------------------------------------------ Fig. 1
def test_fig1_plain_langevin_leaves_mode_weights_wrong():
    mix = fig1()
    g = torch.Generator().manual_seed(0)
    x = sampling.langevin(mix.score, uniform_start(10000, g), step_size=0.1, n_steps=1000, generator=g)
    assert mode_weight_error(x, mix) > claims.PLAIN_LANGEVIN_MIN
    # each mode is sampled correctly locally; only the weights are wrong
    for s in per_mode_std(x, mix):
        assert abs(s - 1.0) < 0.06


def _fig1_annealed(seed, n_steps_each=100, denoise=False):
    mix = fig1()
    sigmas = geometric_sigmas(20.0, 1.0, 10)  # NCSN toy: sigma geometric 20 -> 1, L = 10

    def score(x, sigma):
        return mix.perturb(float(sigma[0])).score(x)  # exact score of p_sigma, all rows share sigma

    g = torch.Generator().manual_seed(seed)
    x0 = uniform_start(10000, g)
    return sampling.annealed_langevin(score, x0, sigmas, n_steps_each=n_steps_each, step_lr=0.1, denoise=denoise, generator=g)


def test_fig1_annealed_langevin_recovers_mode_weights_and_spread():
    # NCSN's toy setting (L = 10, 100 steps per level, eps = 0.1). Measured over 12 seeds x 10k points the
    # major-mode weight is 0.782 +- 0.004: a systematic shortfall of ~0.018 from finite mixing per level
    # (a third of the seeds exceed 0.02). It shrinks to ~0.005 with 400 steps per level (worst of 6 seeds
    # 0.011), so this setting is held to 0.03 and the 0.02 bound is asserted for the slower anneal below.
    mix = fig1()
    x = _fig1_annealed(1)
    assert mode_weight_error(x, mix) <= 0.03
    # Without denoising the chain samples p_{sigma_L}: each mode has std sqrt(1 + sigma_L^2) = sqrt(2)
    # (plus the unadjusted-Langevin bias at step 0.1, ~0.6%).
    for s in per_mode_std(x, mix):
        assert abs(s - math.sqrt(2.0)) < 0.06
    # With the final Tweedie step x + sigma_L^2 s(x, sigma_L) = E[x_0 | x] the spread within a mode is that
    # of the posterior mean: std^2 / sqrt(std^2 + sigma_L^2) = 1 / sqrt(2).
    xd = _fig1_annealed(1, denoise=True)
    assert mode_weight_error(xd, mix) <= 0.03
    for s in per_mode_std(xd, mix):
        assert abs(s - 1 / math.sqrt(2.0)) < 0.04


def test_fig1_annealed_langevin_slower_anneal_within_002():
    mix = fig1()
    x = _fig1_annealed(2, n_steps_each=400)
    assert mode_weight_error(x, mix) <= claims.ANNEALED_EXACT_MAX
    for s in per_mode_std(x, mix):
        assert abs(s - math.sqrt(2.0)) < 0.06


def test_annealed_langevin_step_lr_is_required_keyword():
    with pytest.raises(TypeError):
        sampling.annealed_langevin(lambda x, s: -x, torch.zeros(2, 2), [1.0], 10, 0.1)
    with pytest.raises(TypeError):
        sampling.annealed_langevin(lambda x, s: -x, torch.zeros(2, 2), [1.0], 10)


def test_annealed_langevin_step_convention_on_a_gaussian():
    # target N(0, sigma^2 I) for every level: ULA x <- x + (a/2)(-x/v) + sqrt(a) z has stationary variance
    # v / (1 - a / (4 v)); with step_lr = eps the last level uses a = eps exactly (sigma_i = sigma_L).
    v, eps = 1.0, 0.4
    g = torch.Generator().manual_seed(2)
    x = sampling.annealed_langevin(lambda x, s: -x / v, torch.zeros(20000, 1), [1.0], 300, step_lr=eps, denoise=False, generator=g)
    assert abs(float(x.var()) - v / (1 - eps / (4 * v))) < 0.04


# ------------------------------------------------------------------------------------ SDE samplers
def make_sde(name, N=500):
    # VE: p_T is not N(0, sigma_max^2 I) exactly: the mixture mean (3, 3) is left over. For the deterministic
    # samplers this shifts the weights by ~ phi(Phi^-1(0.8)) |E x . (1,1)/sqrt2| / sigma_max = 1.2 / sigma_max
    # (0.024 at the default sigma_max = 50, see benchmarks/samplers.py); sigma_max = 100 halves that.
    return get_sde(name, N=N, sigma_max=100.0) if name == "ve" else get_sde(name, N=N)


SAMPLER_CASES = [
    ("pc", {}),
    ("pc", {"predictor": "euler_maruyama", "corrector": "none"}),
    ("pc", {"predictor": "ancestral", "corrector": "none"}),
    ("ode", {}),
    ("heun", {}),
    ("dpm_solver", {"steps": 30}),  # measured: weight error 0.017-0.021, per-mode std 1.00-1.07
]


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
@pytest.mark.parametrize("sampler,kwargs", SAMPLER_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "default")
def test_sde_samplers_recover_mode_weights_with_exact_scores(name, sampler, kwargs):
    if kwargs.get("predictor") == "ancestral" and name == "subvp":
        pytest.skip("no ancestral chain for sub-VP")
    mix = fig1()
    sde = make_sde(name)
    g = torch.Generator().manual_seed(10)
    x, nfe = sampling.get_sampler(sampler, sde=sde, **kwargs)(mix.sde_score(sde), (4000, 2), generator=g)
    assert x.shape == (4000, 2) and torch.isfinite(x).all()
    assert mode_weight_error(x, mix) <= 0.03
    for s in per_mode_std(x, mix):
        assert abs(s - 1.0) < 0.1
    assert nfe > 0


@pytest.mark.parametrize("corrector", ["ald", "langevin"])
def test_corrector_only_sampling_runs_but_mixes_slowly(corrector):
    # Corrector-only sampling ("C1000" in Song et al., 2021, Table 1) at snr = 0.16 equilibrates each p_t
    # only partially, so the weights stay between the prior's ~50/50 split and 80/20 (we measured an error
    # of ~0.04 here, and ~0.02 with snr = 0.3); this is a sanity bound, not the 0.03 of the PC samplers.
    mix = fig1()
    sde = make_sde("ve")
    g = torch.Generator().manual_seed(10)
    x, nfe = pc.pc_sampler(sde, mix.sde_score(sde), (4000, 2), predictor="none", corrector=corrector, n_corrector_steps=2, generator=g)
    assert nfe == 1000
    assert mode_weight_error(x, mix) <= 0.06
    for s in per_mode_std(x, mix):  # modes also come out a little wide (~1.1)
        assert abs(s - 1.0) < 0.2


def test_nfe_counts():
    mix = fig1()
    sde = get_sde("vp", N=20)
    sf = mix.sde_score(sde)
    g = torch.Generator().manual_seed(0)
    assert pc.pc_sampler(sde, sf, (8, 2), generator=g)[1] == 40
    assert pc.pc_sampler(sde, sf, (8, 2), corrector="none", generator=g)[1] == 20
    assert pc.pc_sampler(sde, sf, (8, 2), predictor="none", n_corrector_steps=3, generator=g)[1] == 60
    assert sampling.heun_sampler(sde, sf, (8, 2), generator=g)[1] == 35
    assert sampling.heun_sampler(sde, sf, (8, 2), num_steps=5, generator=g)[1] == 9
    _, nfe = sampling.ode_sampler(sde, sf, (8, 2), generator=g)
    _, nfe_d = sampling.ode_sampler(sde, sf, (8, 2), generator=torch.Generator().manual_seed(0), denoise=True)
    assert nfe > 10 and nfe % 6 == 2  # RK45: 6 evaluations per step + 2 for the initial step size
    assert nfe_d >= 2


def test_edm_sigmas():
    s = sampling.edm_sigmas(0.002, 80.0, 18, 7.0)
    assert s.shape == (19,) and float(s[-1]) == 0.0
    assert math.isclose(float(s[0]), 80.0, rel_tol=1e-12) and math.isclose(float(s[-2]), 0.002, rel_tol=1e-12)
    assert torch.all(torch.diff(s) < 0)


# ------------------------------------------------------------------------------------ reproducibility
def _run_all(seed):
    mix = fig1()
    sde = get_sde("ve", N=30)
    sf = mix.sde_score(sde)
    x0 = uniform_start(64, torch.Generator().manual_seed(seed))
    out = {
        "langevin": sampling.langevin(mix.score, x0, 0.1, 20, generator=torch.Generator().manual_seed(seed)),
        "annealed_langevin": sampling.annealed_langevin(
            mix.ncsn_score(), x0, geometric_sigmas(20.0, 1.0, 3), 5, step_lr=0.1, generator=torch.Generator().manual_seed(seed)
        ),
        "ode": sampling.ode_sampler(sde, sf, (64, 2), rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(seed))[0],
        "heun": sampling.heun_sampler(sde, sf, (64, 2), num_steps=6, generator=torch.Generator().manual_seed(seed))[0],
    }
    for p in ["euler_maruyama", "reverse_diffusion", "ancestral", "none"]:
        for c in ["langevin", "ald", "none"]:
            out[f"pc-{p}-{c}"] = pc.pc_sampler(
                sde, sf, (64, 2), predictor=p, corrector=c, denoise=False, generator=torch.Generator().manual_seed(seed)
            )[0]
    return out


def test_every_sampler_is_reproducible_from_its_generator():
    a, b, c = _run_all(0), _run_all(0), _run_all(1)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        if k != "pc-none-none":  # that one returns its prior draw untouched, still seed-dependent
            assert not torch.equal(a[k], c[k]), k
    assert not torch.equal(a["pc-none-none"], c["pc-none-none"])


# ------------------------------------------------------------------------------------------ registry
def test_registries():
    assert set(sampling.sampler_names()) == {"pc", "ode", "heun", "annealed_langevin", "langevin", "dpm_solver"}
    assert pc.get_predictor("ancestral") is pc.AncestralSamplingPredictor
    assert pc.get_corrector("ald") is pc.AnnealedLangevinCorrector
    for getter in [pc.get_predictor, pc.get_corrector]:
        with pytest.raises(ValueError):
            getter("nope")
    with pytest.raises(ValueError):
        pc.pc_sampler(get_sde("subvp", N=5), lambda x, t: -x, (2, 2), predictor="ancestral")


# ---------------------------------------------------------------------------------- one interface
def test_get_sampler_is_one_interface_with_nfe_counted_inside():
    """Every sampler: sampler(score_fn, shape, generator=...) -> (x, nfe); nfe = the calls it made."""
    sde = get_sde("ve", sigma_min=0.01, sigma_max=20.0, N=8)
    sigmas = geometric_sigmas(20.0, 0.5, 4)
    calls = []

    def score(x, c):  # counts calls from outside: the reported NFE must agree
        calls.append(1)
        return -x / (1.0 + c.reshape(-1, 1) ** 2)

    cases = {"annealed_langevin": dict(sigmas=sigmas, n_steps_each=3, step_lr=0.1, denoise=True),
             "langevin": dict(sigmas=sigmas, n_steps_each=3, step_lr=0.1),
             "pc": dict(sde=sde, snr=0.1), "ode": dict(sde=sde, rtol=1e-3, atol=1e-3), "heun": dict(sde=sde, num_steps=4)}
    for name, settings in cases.items():
        calls.clear()
        s = sampling.get_sampler(name, **settings)
        assert s.conditioning == ("sigma" if "langevin" in name else "time")
        x, nfe = s(score, (16, 2), generator=torch.Generator().manual_seed(0))
        assert x.shape == (16, 2) and torch.isfinite(x).all(), name
        assert nfe == len(calls) > 0, name
        again, _ = s(score, (16, 2), generator=torch.Generator().manual_seed(0))
        assert torch.equal(x, again), name  # everything random comes from the generator
    assert sampling.get_sampler("annealed_langevin", **cases["annealed_langevin"])(
        score, (4, 2), generator=torch.Generator())[1] == 4 * 3 + 1
    assert sampling.get_sampler("pc", sde=sde)(score, (4, 2), generator=torch.Generator())[1] == 2 * 8
    assert sampling.get_sampler("heun", sde=sde, num_steps=4)(score, (4, 2), generator=torch.Generator())[1] == 7


def test_get_sampler_names_unknown_settings_and_samplers():
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.get_sampler("euler")
    with pytest.raises(TypeError, match=r"rtol"):
        sampling.get_sampler("heun", sde=get_sde("ve"), rtol=1e-3)
    assert "sigmas" in sampling.sampler_settings("annealed_langevin")
    assert "sde" in sampling.sampler_settings("pc")


def test_sigma_conditioned_uses_the_sde_inverse_noise_level():
    sde = get_sde("ve", sigma_min=0.01, sigma_max=50.0)
    seen = {}

    def score_t(x, t):
        seen["t"] = t
        return x

    sigma = torch.tensor([0.01, 1.0, 50.0])
    sampling.sigma_conditioned(score_t, sde)(torch.zeros(3, 2), sigma)
    assert torch.allclose(sde.noise_level(seen["t"]), sigma, rtol=1e-5)
    assert torch.allclose(seen["t"][[0, 2]], torch.tensor([0.0, 1.0]), atol=1e-6)


def test_dpm_solver_and_heun_churn_in_the_one_interface():
    sde = get_sde("ve", sigma_min=0.01, sigma_max=20.0, N=8)
    calls = []

    def score(x, t):
        calls.append(1)
        return -x / (1.0 + sde.noise_level(t).reshape(-1, 1) ** 2)

    for name, settings, expected in [("dpm_solver", dict(sde=sde, steps=7), 7),
                                     ("heun", dict(sde=sde, num_steps=4, S_churn=10.0), 7)]:
        calls.clear()
        s = sampling.get_sampler(name, **settings)
        assert s.conditioning == "time" and set(settings) <= set(sampling.sampler_settings(name))
        x, nfe = s(score, (16, 2), generator=torch.Generator().manual_seed(0))
        assert x.shape == (16, 2) and torch.isfinite(x).all() and nfe == len(calls) == expected, name
        assert torch.equal(x, s(score, (16, 2), generator=torch.Generator().manual_seed(0))[0]), name
    with pytest.raises(TypeError, match="num_steps"):
        sampling.get_sampler("dpm_solver", sde=sde, num_steps=4)
