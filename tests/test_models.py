"""scoresde.models: shapes, conditioning, score scaling, EMA, factory, CPU speed, a tiny learning check."""

from __future__ import annotations

import io
import math

import pytest
import torch

from scoresde.ema import EMA
from scoresde.models import (
    GaussianFourierProjection,
    ScoreMLP,
    SinusoidalEmbedding,
    build_model,
    get_score_fn,
)
from scoresde.unet import UNET_PRESETS, ScoreUNet


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------


def test_fourier_embeds_log_sigma():
    torch.manual_seed(0)  # W ~ N(0, scale^2): unseeded, float32 error of sin(2*pi*W) occasionally exceeded atol
    emb = GaussianFourierProjection(16, scale=16.0)
    e = emb(torch.tensor([1.0, math.e]))
    assert e.shape == (2, 16)
    assert torch.allclose(e[0], torch.cat([torch.zeros(8), torch.ones(8)]))  # log 1 = 0
    assert torch.allclose(e[1, :8], torch.sin(2 * math.pi * emb.W), atol=1e-5)  # log e = 1


def test_sinusoidal_embeds_1000_t():
    emb = SinusoidalEmbedding(8)
    e = emb(torch.tensor([0.0, 0.001]))
    assert torch.allclose(e[0], torch.cat([torch.zeros(4), torch.ones(4)]))
    # 1000 * 0.001 = step 1: first frequency is 1 (DDPM's get_timestep_embedding)
    assert math.isclose(e[1, 0].item(), math.sin(1.0), rel_tol=1e-6)
    assert math.isclose(e[1, 3].item(), math.sin(1e-4), rel_tol=1e-4)  # last frequency 10000^-1


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_mlp_shapes(embedding):
    torch.manual_seed(0)
    model = ScoreMLP(2, embedding=embedding)
    assert model.embedding == embedding
    x = torch.randn(5, 2)
    c = torch.rand(5) + 0.1
    assert model(x, c).shape == (5, 2)
    assert model(x, 0.5).shape == (5, 2)  # a scalar conditioning is broadcast
    with pytest.raises(ValueError):
        model(x, torch.rand(4))


@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (32, 3), (64, 3)])
@pytest.mark.parametrize("embedding", ["fourier", "sinusoidal"])
def test_unet_shapes_for_each_dataset_size(size, channels, embedding):
    torch.manual_seed(0)
    cfg = dict(UNET_PRESETS[size])
    if size == 64:
        cfg["ch"] = 16  # keep the 64x64 forward cheap in the test
    model = ScoreUNet(in_channels=channels, image_size=size, embedding=embedding, **cfg)
    assert model.embedding == embedding
    attn_res = set(cfg["attn_resolutions"]) & set(model.resolutions)
    assert attn_res, "the preset places attention at a resolution the net reaches"
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0.5, 2.0]))
    assert out.shape == x.shape


def test_unet_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="divisible"):
        ScoreUNet(image_size=28, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="embedding"):
        ScoreUNet(embedding="learned")
    model = ScoreUNet()
    with pytest.raises(ValueError, match="expected x"):
        model(torch.randn(2, 1, 16, 16), torch.ones(2))


def test_unet_starts_at_zero_and_learns():
    """Zero-initialised output conv: s = 0 at init; a few DSM steps on a fixed batch lower the loss."""
    torch.manual_seed(0)
    model = ScoreUNet()
    g = _gen(1)
    x = torch.rand(32, 1, 8, 8, generator=g)
    sigma = torch.exp(torch.rand(32, generator=g) * math.log(50.0))
    z = torch.randn(x.shape, generator=g)
    assert torch.count_nonzero(model(x + sigma[:, None, None, None] * z, sigma)) == 0
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(10):
        out = model(x + sigma[:, None, None, None] * z, sigma)
        loss = 0.5 * ((out + z) ** 2).sum(dim=(1, 2, 3)).mean()  # NCSN DSM with λ=σ², technique 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# score functions
# ------------------------------------------------------------------------------------------------


class _Spy(torch.nn.Module):
    """Returns a fixed output and records what it was conditioned on."""

    def __init__(self, embedding: str):
        super().__init__()
        self.embedding = embedding
        self.seen = None

    def forward(self, x, c):
        self.seen = c
        return torch.ones_like(x) * 3.0


class _FakeSDE:
    """Duck-typed SDE: mean = x, std(t) = 2 t + 0.5."""

    def marginal_prob(self, x, t):
        return x, 2.0 * t + 0.5


def test_ncsn_score_divides_by_sigma():
    model = _Spy("fourier")
    score_fn = get_score_fn(model)
    x = torch.zeros(3, 1, 4, 4)
    sigma = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)  # float64 sigmas keep x's dtype
    s = score_fn(x, sigma)
    assert s.dtype == torch.float32 and s.shape == x.shape
    assert torch.allclose(s[:, 0, 0, 0], torch.tensor([6.0, 3.0, 0.75]))
    assert torch.equal(model.seen, sigma)


@pytest.mark.parametrize("embedding,cond", [("fourier", "std"), ("sinusoidal", "t")])
def test_sde_score_divides_by_std_and_conditions_right(embedding, cond):
    model = _Spy(embedding)
    score_fn = get_score_fn(model, _FakeSDE())
    x = torch.zeros(2, 2)
    t = torch.tensor([0.25, 0.75])
    std = 2.0 * t + 0.5
    s = score_fn(x, t)
    assert torch.allclose(s, 3.0 / std[:, None].expand(2, 2))
    assert torch.allclose(model.seen, std if cond == "std" else t)


def test_score_fn_with_real_sdes():
    sde_mod = pytest.importorskip("scoresde.sde")
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    ve = sde_mod.get_sde("ve")
    model = _Spy("fourier")
    s = get_score_fn(model, ve)(x, t)
    _, std = ve.marginal_prob(x, t)
    assert torch.allclose(model.seen, std) and torch.allclose(s, 3.0 / std[:, None, None, None].expand_as(x))
    vp = sde_mod.get_sde("vp")
    model = _Spy("sinusoidal")
    s = get_score_fn(model, vp)(x, t)
    _, std = vp.marginal_prob(x, t)
    assert torch.equal(model.seen, t) and torch.allclose(s, 3.0 / std[:, None, None, None].expand_as(x))


def test_score_fn_needs_embedding_attribute():
    with pytest.raises(ValueError, match="embedding"):
        get_score_fn(torch.nn.Linear(2, 2))


def test_mlp_learns_gaussian_score():
    """With x ~ N(0, I), the σ-perturbed score is -x/(1+σ²); DSM + technique 3 recovers it."""
    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=64, n_layers=2)
    score_fn = get_score_fn(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = _gen(0)
    sigmas = torch.tensor([0.5, 1.0, 2.0])
    for _ in range(250):
        x = torch.randn(128, 2, generator=g)
        sigma = sigmas[torch.randint(0, 3, (128,), generator=g)]
        z = torch.randn(128, 2, generator=g)
        loss = 0.5 * ((model(x + sigma[:, None] * z, sigma) + z) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for s in sigmas:
            xt = torch.randn(2000, 2, generator=g) * math.sqrt(1 + s**2)
            pred = score_fn(xt, torch.full((2000,), float(s)))
            true = -xt / (1 + s**2)
            rel = (pred - true).pow(2).sum(1).mean() / true.pow(2).sum(1).mean()
            assert rel < 0.05, f"sigma={float(s)}: relative error {float(rel):.3f}"


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------


class _WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.register_buffer("count", torch.zeros(()))


def test_ema_update_math_and_buffers():
    torch.manual_seed(0)
    model = _WithBuffer()
    w0 = model.lin.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.count.fill_(7)
    ema.update(model)
    assert torch.allclose(ema.shadow["lin.weight"], 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert ema.shadow["count"].item() == 7  # buffers are copied, not averaged
    ema.update(model)
    assert torch.allclose(ema.shadow["lin.weight"], w0 + 1.0 - 0.81)


def test_ema_copy_to_and_average_parameters():
    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=8, n_layers=1)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    ema.update(model)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters(model) as m:
        assert m is model
        assert torch.allclose(model.out.bias, own["out.bias"] - 1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, own[k])  # restored
    other = ScoreMLP(2, hidden=8, n_layers=1)
    ema.copy_to(other)
    assert torch.equal(other.out.bias, ema.shadow["out.bias"])
    other.load_state_dict(ema.state_dict()["shadow"])  # the shadow is a model state_dict


def test_ema_state_dict_roundtrip_weights_only_and_deterministic():
    def run():
        torch.manual_seed(0)
        model = ScoreMLP(2, hidden=8, n_layers=1)
        ema = EMA(model, decay=0.99, use_num_updates=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = _gen(0)
        for _ in range(5):
            loss = model(torch.randn(4, 2, generator=g), torch.ones(4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
        return model, ema

    model, ema = run()
    _, ema2 = run()
    for k in ema.shadow:
        assert torch.equal(ema.shadow[k], ema2.shadow[k])
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = EMA(ScoreMLP(2, hidden=8, n_layers=1), decay=0.5)
    fresh.load_state_dict(state)
    assert fresh.decay == 0.99 and fresh.num_updates == 5 and fresh.use_num_updates
    for k in ema.shadow:
        assert torch.equal(fresh.shadow[k], ema.shadow[k])
    with pytest.raises(KeyError):
        EMA(ScoreMLP(3, hidden=8, n_layers=2)).load_state_dict(state)


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))


def _ema_closed_form(decay, thetas, warmup=True):
    """Shadow after k updates towards thetas[1..k] from thetas[0]: Π d_n θ_0 + Σ_n (1 − d_n) Π_{m>n} d_m θ_n."""
    k = len(thetas) - 1
    d = [None] + [min(decay, (1 + n) / (10 + n)) if warmup else decay for n in range(1, k + 1)]
    total = math.prod(d[1:]) * thetas[0]
    for n in range(1, k + 1):
        total += (1 - d[n]) * math.prod(d[n + 1:]) * thetas[n]
    return total


@pytest.mark.parametrize("decay", [0.9, 0.2])
def test_ema_warmup_matches_the_closed_form(decay):
    # score_sde: decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update. decay = 0.2 switches rule after n = 1
    # (2/11 < 0.2 < 3/12); 0.9 stays on the warm-up branch for all 6 updates (it reaches 0.9 at n = 80).
    thetas = [0.0, 1.0, -2.0, 3.5, 0.25, 7.0, -1.0]
    model = _Scalar()
    ema = EMA(model, decay=decay, warmup=True)
    for n, th in enumerate(thetas[1:], start=1):
        with torch.no_grad():
            model.theta.fill_(th)
        ema.update(model)
        assert ema.num_updates == n
        assert math.isclose(float(ema.shadow["theta"]), _ema_closed_form(decay, thetas[: n + 1]), rel_tol=1e-12)
    # by hand for the first two updates with decay 0.9: d_1 = 2/11, d_2 = 3/12
    assert math.isclose(_ema_closed_form(0.9, thetas[:3]), 3 / 12 * (9 / 11 * 1.0) + 9 / 12 * -2.0, rel_tol=1e-12)
    plain = EMA(_Scalar(), decay=decay)
    assert not plain.warmup and plain.use_num_updates is False
    assert EMA(_Scalar(), use_num_updates=True).warmup  # the older name of the flag


def test_ema_warmup_counter_resumes_and_old_state_dicts_load():
    thetas = [0.0, 1.0, -2.0, 3.5, 0.25, 7.0]
    model = _Scalar()
    ema = EMA(model, decay=0.95, warmup=True)
    for th in thetas[1:3]:
        with torch.no_grad():
            model.theta.fill_(th)
        ema.update(model)
    state = ema.state_dict()
    assert state["num_updates"] == 2 and state["warmup"] is True
    resumed = EMA(_Scalar(), decay=0.5)  # constructor settings are replaced by the saved ones
    resumed.load_state_dict(state)
    for th in thetas[3:]:
        with torch.no_grad():
            model.theta.fill_(th)
        ema.update(model)
        resumed.update(model)
    assert resumed.num_updates == 5 and resumed.warmup
    assert float(resumed.shadow["theta"]) == float(ema.shadow["theta"])
    assert math.isclose(float(ema.shadow["theta"]), _ema_closed_form(0.95, thetas), rel_tol=1e-12)
    # a state dict of the previous version (flag under "use_num_updates") and one older still (no flag, no count)
    old = {k: v for k, v in state.items() if k != "warmup"}
    again = EMA(_Scalar())
    again.load_state_dict(old)
    assert again.warmup and again.num_updates == 2
    oldest = {"decay": 0.95, "shadow": state["shadow"]}
    legacy = EMA(_Scalar(), warmup=True)
    legacy.load_state_dict(oldest)  # written by a constant-decay EMA: continued without warm-up
    assert not legacy.warmup and legacy.num_updates == 0 and legacy.decay == 0.95


def test_multi_tensor_ema_follows_the_warmup():
    from scoresde.fastpath import MultiTensorEMA

    torch.manual_seed(0)
    model = ScoreMLP(2, hidden=8, n_layers=1)
    loop, fast = EMA(model, decay=0.99, warmup=True), EMA(model, decay=0.99, warmup=True)
    fe = MultiTensorEMA(fast, model)
    assert fe.ok
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        loop.update(model)
        fe.update(model)
    assert fast.num_updates == loop.num_updates == 4
    for k in loop.shadow:
        assert torch.allclose(fast.shadow[k], loop.shadow[k], atol=1e-6)


def test_train_config_ema_warmup_flag():
    from scoresde.training import TrainConfig

    assert TrainConfig(steps=1, batch_size=1, lr=1e-3).ema_warmup is True
    assert TrainConfig.from_dict({"steps": 1, "batch_size": 1, "lr": 1e-3, "ema_warmup": False}).ema_warmup is False
    with pytest.raises(ValueError, match="ema_warmup"):
        TrainConfig(steps=1, batch_size=1, lr=1e-3, ema_warmup="yes")


# ------------------------------------------------------------------------------------------------
# build_model
# ------------------------------------------------------------------------------------------------


def test_build_model_dispatch():
    mlp = build_model({"name": "mlp", "hidden": 32}, (2,))
    assert isinstance(mlp, ScoreMLP) and mlp.dim == 2
    unet = build_model({"name": "unet", "ch_mult": [1, 2, 2], "attn_resolutions": [7],
                        "embedding": "sinusoidal"}, (1, 28, 28))
    assert isinstance(unet, ScoreUNet) and unet.image_size == 28 and unet.in_channels == 1
    assert unet.embedding == "sinusoidal"
    assert isinstance(build_model({}, (3, 8, 8)), ScoreUNet)  # name inferred from the shape


def test_build_model_errors_name_the_key():
    with pytest.raises(ValueError, match="transformer"):
        build_model({"name": "transformer"}, (2,))
    with pytest.raises(ValueError, match="widht"):
        build_model({"name": "unet", "widht": 3}, (1, 8, 8))
    with pytest.raises(ValueError, match="in_channels"):
        build_model({"name": "unet", "in_channels": 3}, (1, 8, 8))
    with pytest.raises(ValueError, match="name"):
        build_model({"name": "mlp"}, (1, 8, 8))
    with pytest.raises(ValueError, match="data_shape"):
        build_model({}, (8, 8))


def test_build_model_seed_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model({"name": "mlp"}, (2,), seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model({"name": "mlp"}, (2,), seed=7)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
