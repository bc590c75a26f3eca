"""scoresde.edm (Karras et al., 2022): preconditioning, loss, EDMPrecond, and the Heun sampler's churn, in closed form.

Gaussian data y ~ N(μ, s² I_d) makes everything exact: p(x; σ) = N(μ, (s² + σ²) I), the ideal denoiser is
D*(x; σ) = E[y | x] = μ + s² / (s² + σ²) (x − μ), its per-dimension error is the posterior variance
s² σ² / (s² + σ²), so the minimum of EDM's loss is

    L* = d E_σ[ λ(σ) s² σ² / (s² + σ²) ] = d E_σ[ s² (σ² + σ_d²) / (σ_d² (s² + σ²)) ],   ln σ ~ N(P_mean, P_std²),

which is exactly d when s = σ_d (λ makes every σ count the same: EDM's "unit loss weight" design).
"""

import math

import numpy as np
import pytest
import torch

from scoresde import sampling
from scoresde.edm import EDMPrecond, edm_coefficients, edm_loss, edm_sde_score
from scoresde.losses import get_objective, objective_names, objective_settings
from scoresde.models import GaussianFourierProjection, ScoreMLP, SinusoidalEmbedding, build_model, get_score_fn
from scoresde.sde import bcast, get_sde

MU, S = 0.7, 0.5


def d_star(x, sigma, mu=MU, s=S):
    return mu + s**2 / (s**2 + bcast(sigma, x) ** 2) * (x - mu)


def expected_min_loss(d, s, sigma_data=0.5, P_mean=-1.2, P_std=1.2):
    # E over ln σ ~ N(P_mean, P_std²) by Gauss–Hermite quadrature (100 nodes: exact to ~1e-12 here)
    z, w = np.polynomial.hermite_e.hermegauss(100)
    sigma = np.exp(P_mean + P_std * z)
    val = s**2 * (sigma**2 + sigma_data**2) / (sigma_data**2 * (s**2 + sigma**2))
    return d * float(np.sum(w * val) / np.sqrt(2 * np.pi))


# ----------------------------------------------------------------------------------------- coefficients
def test_edm_coefficients_closed_form():
    # σ = σ_d = 0.5: c_skip = 1/2, c_out = 0.25 / (0.5 √2) = 1/(2√2), c_in = √2, c_noise = ln(0.5)/4
    c_skip, c_out, c_in, c_noise = edm_coefficients(0.5)
    assert math.isclose(c_skip, 0.5) and math.isclose(c_out, 1 / (2 * math.sqrt(2)))
    assert math.isclose(c_in, math.sqrt(2)) and math.isclose(c_noise, math.log(0.5) / 4)
    # σ = 80, σ_d = 0.5: c_skip = 0.25 / 6400.25, c_out = 40 / √6400.25, c_in = 1 / √6400.25, c_noise = ln(80)/4
    c_skip, c_out, c_in, c_noise = edm_coefficients(80.0)
    assert math.isclose(c_skip, 0.25 / 6400.25) and math.isclose(c_out, 40 / math.sqrt(6400.25))
    assert math.isclose(c_in, 1 / math.sqrt(6400.25)) and math.isclose(c_noise, math.log(80) / 4)
    # σ = 0.002, σ_d = 1: nearly the identity
    c_skip, c_out, c_in, c_noise = edm_coefficients(0.002, sigma_data=1.0)
    assert math.isclose(c_skip, 1 / 1.000004) and math.isclose(c_out, 0.002 / math.sqrt(1.000004))
    assert math.isclose(c_noise, math.log(0.002) / 4)
    # tensors: same values, elementwise, and c_skip + c_out² / σ_d² = 1 (the unit-variance construction)
    sig = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    cs = edm_coefficients(sig, 0.3)
    for k, v in enumerate(sig.tolist()):
        for got, want in zip(cs, edm_coefficients(v, 0.3)):
            assert math.isclose(float(got[k]), want, rel_tol=1e-12)
    assert torch.allclose(cs[0] + cs[1] ** 2 / 0.09, torch.ones(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("s", [0.5, 0.3])
def test_edm_loss_of_the_exact_denoiser_is_the_analytic_minimum(s):
    d, n = 4, 100_000
    x0 = MU + s * torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss(denoiser):  # common random numbers: every denoiser sees the same σ's and noise
        return float(edm_loss(denoiser, x0, generator=torch.Generator().manual_seed(2)))

    best = loss(lambda x, sigma: d_star(x, sigma, s=s))
    target = expected_min_loss(d, s)
    if s == 0.5:
        assert math.isclose(target, d, rel_tol=1e-9)
    # Per-sample loss = w(σ) χ²_d with w ≤ 1: sd ≤ √(d² + 2d) = 4.9, standard error ≤ 0.016 (0.4-0.6 % of L*).
    assert abs(best - target) < 0.03 * target
    assert loss(lambda x, sigma: d_star(x, sigma, s=s) + 0.02) > best  # biased
    assert loss(lambda x, sigma: d_star(x, sigma, s=1.1 * s)) > best  # too little shrinkage
    assert loss(lambda x, sigma: d_star(x, sigma, s=0.9 * s)) > best  # too much
    assert loss(lambda x, sigma: d_star(x, sigma, mu=MU + 0.05, s=s)) > best  # wrong mean


def test_edm_loss_draws_lognormal_sigma_and_weights_by_lambda():
    seen = {}

    def denoiser(x, sigma):
        seen["sigma"] = sigma
        return torch.zeros_like(x)

    x0 = torch.ones(50_000, 1, dtype=torch.float64)
    value = edm_loss(denoiser, x0, P_mean=-1.2, P_std=1.2, sigma_data=0.5, generator=torch.Generator().manual_seed(0))
    ln_sigma = torch.log(seen["sigma"])
    assert abs(float(ln_sigma.mean()) + 1.2) < 0.03 and abs(float(ln_sigma.std()) - 1.2) < 0.03
    lam = (seen["sigma"] ** 2 + 0.25) / (seen["sigma"] * 0.5) ** 2  # D = 0: loss = mean λ(σ) ‖x0‖²
    assert torch.allclose(value, lam.mean())


# ------------------------------------------------------------------------------------------ EDMPrecond
class _SolvedF(torch.nn.Module):
    """F_θ chosen so that c_skip x + c_out F(c_in x; c_noise) = D*(x; σ): F = (D*(x) − c_skip x) / c_out, with σ
    and x recovered from what EDMPrecond feeds the network (c = σ^¼ for "fourier", c_noise / 1000 for "sinusoidal")."""

    def __init__(self, embedding, sigma_data=0.5):
        super().__init__()
        self.embedding, self.sigma_data = embedding, sigma_data

    def forward(self, x_in, c):
        sigma = c**4 if self.embedding == "fourier" else torch.exp(4 * 1000.0 * c)
        c_skip, c_out, c_in, _ = edm_coefficients(sigma, self.sigma_data)
        x = x_in / bcast(c_in, x_in)
        return (d_star(x, sigma) - bcast(c_skip, x) * x) / bcast(c_out, x)


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_edm_precond_recovers_the_exact_denoiser_and_score(embedding):
    pre = EDMPrecond(_SolvedF(embedding, 0.3), sigma_data=0.3)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), 64, dtype=torch.float64))
    assert torch.allclose(pre(x, sigma), d_star(x, sigma), rtol=1e-10, atol=1e-10)
    exact_score = -(x - MU) / bcast(S**2 + sigma**2, x)
    assert torch.allclose(pre.score(x, sigma), exact_score, rtol=1e-6, atol=1e-8)
    assert torch.allclose(get_score_fn(pre)(x, sigma), exact_score, rtol=1e-6, atol=1e-8)
    # t-conditioned, for every SDE: the marginal x_t ~ N(α μ, (α² s² + σ_t²) I) has score −(x − α μ)/(α² s² + σ_t²)
    for name in ["ve", "vp", "subvp"]:
        sde = get_sde(name)
        t = torch.linspace(1e-3, 1.0, 64, dtype=torch.float64)
        a = sde.mean_coeff(t)
        std = sde.marginal_prob(x, t)[1]
        want = -(x - bcast(a, x) * MU) / bcast(a**2 * S**2 + std**2, x)
        assert torch.allclose(get_score_fn(pre, sde)(x, t), want, rtol=1e-6, atol=1e-8), name
        assert torch.allclose(edm_sde_score(pre, sde)(x, t), want, rtol=1e-6, atol=1e-8), name


def test_edm_precond_feeds_the_network_embedding_c_noise():
    c_noise = 0.25 * torch.log(torch.tensor([0.002, 0.5, 80.0]))
    # Fourier: the network embeds log c, so c = exp(c_noise) gives sin/cos(2π W c_noise)
    four = EDMPrecond(ScoreMLP(2, hidden=8, n_layers=1, embedding="fourier"))
    torch.manual_seed(0)  # W ~ N(0, scale²); scale 1 keeps sin's float32 argument small (log(exp(c)) rounds)
    emb = GaussianFourierProjection(8, scale=1.0)
    proj = 2 * math.pi * c_noise[:, None] * emb.W[None, :]
    assert torch.allclose(emb(four.net_condition(c_noise)), torch.cat([proj.sin(), proj.cos()], -1), atol=1e-5)
    # Sinusoidal: the network embeds 1000 c, so c = c_noise / 1000 gives EDM's positional embedding of c_noise
    sinu = EDMPrecond(ScoreMLP(2, hidden=8, n_layers=1, embedding="sinusoidal", emb_dim=8))
    emb = SinusoidalEmbedding(8)
    freqs = (1 / 10000.0) ** (torch.arange(4) / 3)
    arg = c_noise[:, None] * freqs[None, :]
    assert torch.allclose(emb(sinu.net_condition(c_noise)), torch.cat([arg.sin(), arg.cos()], -1), atol=1e-6)


def test_build_model_precond_edm_saves_and_loads_by_state_dict():
    cfg = {"name": "mlp", "hidden": 16, "n_layers": 1, "embedding": "sinusoidal", "precond": "edm", "sigma_data": 0.4}
    model = build_model(cfg, (2,), seed=0)
    assert isinstance(model, EDMPrecond) and model.sigma_data == 0.4 and isinstance(model.net, ScoreMLP)
    assert all(k.startswith("net.") for k in model.state_dict())
    plain = build_model({k: v for k, v in cfg.items() if k not in ("precond", "sigma_data")}, (2,), seed=0)
    for k, v in plain.state_dict().items():  # same seeded network inside
        assert torch.equal(model.state_dict()["net." + k], v)
    again = build_model(cfg, (2,), seed=1)
    again.load_state_dict(model.state_dict())
    x, sigma = torch.randn(5, 2), torch.rand(5) + 0.1
    assert torch.equal(again(x, sigma), model(x, sigma))
    assert build_model({"name": "mlp", "precond": "edm"}, (2,)).sigma_data == 0.5
    with pytest.raises(ValueError, match="precond"):
        build_model({"name": "mlp", "precond": "vp"}, (2,))
    with pytest.raises(ValueError, match="sigma_data"):
        build_model({"name": "mlp", "sigma_data": 0.5}, (2,))


def test_edm_objective_trains_through_the_engine(tmp_path):
    from scoresde.training import TrainConfig, train

    assert {"dsm", "sde_dsm", "edm"} <= set(objective_names())
    assert set(objective_settings("edm")) == {"P_mean", "P_std", "sigma_data"}
    with pytest.raises(TypeError, match="nope"):
        get_objective("edm", nope=1)
    with pytest.raises(TypeError, match="EDM denoiser"):
        get_objective("edm")(ScoreMLP(2, hidden=8, n_layers=1), torch.zeros(4, 2), torch.Generator())
    model = build_model({"name": "mlp", "hidden": 32, "n_layers": 2, "precond": "edm"}, (2,), seed=0)
    data = MU + S * torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(steps=60, batch_size=128, lr=3e-3, ckpt_every=60, log_every=20, device="cpu",
                         handle_signals=False)
    res = train(model, get_objective("edm"), data, config, tmp_path, progress=False)
    # s = σ_d data: the minimum is d = 2 (module docstring); measured window means 2.86 (steps 1-20) -> 2.13 (41-60).
    first, last = res.losses[0][1], res.losses[-1][1]
    assert last < first and last < 2.5
    assert res.ema.warmup and res.ema.num_updates == 60


# ----------------------------------------------------------------------------- Heun sampler with churn
def gaussian_score(sde, mu=MU, s=S):
    def score(x, t):
        t64 = t.to(torch.float64)
        a = sde.mean_coeff(t64)
        std = sde.marginal_prob(torch.zeros(t.shape[0], 1, dtype=torch.float64), t64)[1]
        return (-(x - bcast(a, x) * mu) / bcast(a**2 * s**2 + std**2, x)).to(x.dtype)
    return score


def test_heun_without_churn_is_algorithm_1_and_draws_nothing_more():
    sde = get_sde("ve", sigma_min=0.002, sigma_max=80.0)
    score = gaussian_score(sde)
    runs = {}
    for key, kw in {"default": {}, "zero": dict(S_churn=0.0, S_noise=1.007),
                    "out_of_range": dict(S_churn=40.0, S_tmin=100.0)}.items():
        g = torch.Generator().manual_seed(0)
        x, nfe = sampling.heun_sampler(sde, score, (256, 2), generator=g, **kw)
        runs[key] = (x, nfe, g.get_state())
    for key in ("zero", "out_of_range"):
        assert torch.equal(runs[key][0], runs["default"][0]) and runs[key][1] == 35
        assert torch.equal(runs[key][2], runs["default"][2])  # no random number drawn after x_T


def test_heun_churn_costs_no_extra_nfe_and_is_reproducible():
    sde = get_sde("vp")
    s = sampling.get_sampler("heun", sde=sde, S_churn=10.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003)
    a, nfe = s(gaussian_score(sde), (128, 2), generator=torch.Generator().manual_seed(0))
    b, _ = s(gaussian_score(sde), (128, 2), generator=torch.Generator().manual_seed(0))
    plain, _ = sampling.get_sampler("heun", sde=sde)(gaussian_score(sde), (128, 2), generator=torch.Generator().manual_seed(0))
    assert nfe == 35 and torch.equal(a, b) and not torch.equal(a, plain)
    assert {"S_churn", "S_tmin", "S_tmax", "S_noise"} <= set(sampling.sampler_settings("heun"))


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_heun_churn_samples_the_gaussian_target(name):
    # 64 steps, S_churn = 8 (γ = 1/8): measured here mean 0.699 (VE) / 0.700 (VP), variance +1.2 % / +0.1 %;
    # with 200 000 points the discretisation bias is ~+1.8 % (Heun's error on the raised steps σ̂ → σ_{i+1};
    # 18 steps with γ = √2 − 1 give +26 %, Heun without churn +12 %: the one-scale Gaussian has all its
    # curvature near σ = s). MC standard errors at n = 20 000: mean 0.0035, variance 1 %.
    sde = get_sde("ve", sigma_min=0.002, sigma_max=80.0) if name == "ve" else get_sde("vp")
    x, nfe = sampling.heun_sampler(sde, gaussian_score(sde), (20_000, 1), num_steps=64, S_churn=8.0,
                                   generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert nfe == 127
    assert abs(float(x.mean()) - MU) < 0.015
    assert abs(float(x.var()) / S**2 - 1) < 0.06


def test_heun_churn_corrects_a_prior_mismatch():
    # σ_max = 2 is far too small for data at μ = 2: the ODE started from N(0, σ_max²) keeps the offset (mean 1.50),
    # churn's fresh noise + ODE steps contract towards p(x; σ) at each level (measured mean 1.983, variance 0.260).
    sde = get_sde("ve", sigma_min=0.002, sigma_max=2.0)
    score = gaussian_score(sde, mu=2.0)
    kw = dict(num_steps=32, dtype=torch.float64)
    det, _ = sampling.heun_sampler(sde, score, (20_000, 1), generator=torch.Generator().manual_seed(0), **kw)
    churn, _ = sampling.heun_sampler(sde, score, (20_000, 1), S_churn=20.0, generator=torch.Generator().manual_seed(0), **kw)
    assert abs(float(det.mean()) - 2.0) > 0.4
    assert abs(float(churn.mean()) - 2.0) < 0.05
    assert abs(float(churn.var()) / S**2 - 1) < 0.08
