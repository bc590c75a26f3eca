"""The EDM model kind through the pipeline, NCSN under continuous-time samplers, and FID error bars.

- ``train_model("edm")`` builds the preconditioned denoiser, trains it with EDM's loss, and ``load_trained``
  rebuilds it from the saved config; every sampler family draws from it.
- The FID bootstrap: its std shrinks like 1/sqrt(n) for Gaussian features; ``significant`` is the 95 % rule
  of the difference of two independent scores.
- The samplers section: one stage per model, each method's config carries the keys it sets.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from pipeline.params import ParamsError
from pipeline.quality import Z95, compare, quality_keys, significant

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _digits(n: int = 128) -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)


class _NoRun:
    def log_metrics(self, *a, **k):
        pass


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory):
    from pipeline.schedule import NOISE, build_schedule
    from pipeline.trainer import model_config, train_model
    from scoresde.checkpoint import save_model

    p = _params()
    x = _digits()
    schedule = build_schedule(NOISE.validate(p["noise"], "noise"), x)
    cfg = {**p["train"]["edm"], "steps": 12, "log_every": 4, "ckpt_every": 100, "warmup": 0, "batch_size": 16}
    cfg["model"] = {**cfg["model"], "ch": 8, "attn_resolutions": []}
    d = tmp_path_factory.mktemp("edm")
    model, ema, result = train_model("edm", cfg, schedule, x, "cpu", _NoRun(), d / "ck", "fp", seed=0, progress=False)
    save_model(str(d / "edm.pt"), model, ema, {"kind": "edm", "centered": True, "model": model_config("edm", cfg, schedule),
                                              "data_shape": [1, 8, 8]})
    return d / "edm.pt", schedule, result


def test_edm_kind_trains_the_preconditioned_denoiser(edm_model):
    from pipeline.generation import load_trained
    from scoresde.edm import EDMPrecond

    path, schedule, result = edm_model
    assert len(result.losses) == 3 and all(math.isfinite(loss) for _, loss in result.losses)
    model, info = load_trained(path, "cpu")
    assert isinstance(model, EDMPrecond)
    assert model.sigma_data == schedule["edm"]["sigma_data"] == 0.5
    assert info["model"]["precond"] == "edm"


@pytest.mark.parametrize("cfg, nfe", [
    ({"sampler": "heun", "num_steps": 18, "rho": 7.0, "S_churn": 0.0}, 35),
    ({"sampler": "heun", "num_steps": 6, "rho": 7.0, "S_churn": 10.0}, 11),
    ({"sampler": "dpm_solver", "steps": 10}, 10),
    ({"sampler": "pc", "steps": 5, "predictor": "reverse_diffusion", "corrector": "none", "denoise": True}, 5),
    ({"sampler": "annealed_langevin", "n_steps_each": 2, "step_lr": 4e-5, "denoise": True}, None),
])
def test_every_sampler_family_draws_from_the_edm_model(edm_model, cfg, nfe):
    from pipeline.generation import generate, load_trained

    path, schedule, _ = edm_model
    model, _ = load_trained(path, "cpu")
    x, got, _ = generate("edm", model, {**cfg, "batch_size": 8}, schedule, 8, "cpu", torch.Generator().manual_seed(0),
                         True)
    assert x.shape == (8, 1, 8, 8) and torch.isfinite(x).all() and 0 <= float(x.min()) <= float(x.max()) <= 1
    if nfe is not None:
        assert got == nfe


def test_ncsn_runs_under_the_continuous_samplers():
    """NCSN's σ-conditioned network is read as a VE model over [σ_L, σ_1]: the ODE solvers accept it."""
    from pipeline.generation import build_sampler, score_function
    from pipeline.schemas import sample_section
    from scoresde.models import build_model

    cfg = sample_section("ncsn").validate({"sampler": "dpm_solver", "n": 4, "batch_size": 4, "steps": 5}, "sample.ncsn")
    schedule = {"sigmas": [1.0, 0.1, 0.01], "sigma_begin": 1.0, "sigma_end": 0.01, "data_shape": [1, 8, 8]}
    model = build_model({"name": "unet", "ch": 8, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [],
                         "embedding": "fourier"}, (1, 8, 8), seed=0).eval()
    sampler = build_sampler("ncsn", cfg, schedule, "cpu")
    sde = sampler.settings["sde"]
    assert (sde.sigma_min, sde.sigma_max) == (0.01, 1.0)
    x, nfe = sampler(score_function("ncsn", model, sampler, schedule), (4, 1, 8, 8), generator=torch.Generator())
    assert nfe == 5 and torch.isfinite(x).all()


# --------------------------------------------------------------------------- error bars
def test_fid_bootstrap_std_shrinks_like_one_over_sqrt_n():
    from pipeline.fidelity import Reference, fid_bootstrap

    rng = np.random.default_rng(0)
    d = 8
    ref_feats = rng.normal(size=(20000, d)).astype(np.float32)
    ref = Reference("x", "features", ref_feats, ref_feats.mean(0), np.cov(ref_feats, rowvar=False))
    stds = {}
    for n in (200, 800):
        feats = rng.normal(0.3, 1.0, size=(n, d))
        boots = fid_bootstrap(feats, ref, 200, seed=1)
        assert boots.shape == (200,) and np.isfinite(boots).all()
        stds[n] = boots.std(ddof=1)
    # 4x the samples -> about half the spread (bootstrap noise of 200 replicates: ±10 %)
    assert 0.35 < stds[800] / stds[200] < 0.7, stds
    # the same seed gives the same replicates: error bars are reproducible
    feats = rng.normal(size=(100, d))
    assert np.array_equal(fid_bootstrap(feats, ref, 20, seed=3), fid_bootstrap(feats, ref, 20, seed=3))


def test_significance_rule_is_the_95_percent_interval_of_the_difference():
    assert significant(10.0, 1.0, 10.0 + Z95 * math.sqrt(2) * 1.01, 1.0)
    assert not significant(10.0, 1.0, 10.0 + Z95 * math.sqrt(2) * 0.99, 1.0)
    assert "not distinguishable" in compare(11.87, 0.5, 11.19, 0.5)
    assert "significant" in compare(13.27, 0.5, 82.77, 2.0)
    assert quality_keys("digits_cnn", 256)["fid_std"] == "fid_digits_cnn_n256_std"


# --------------------------------------------------------------------------- samplers section
def test_samplers_section_runs_each_model_and_names_bad_models():
    from pipeline.cost import SAMPLERS_SECTION, method_configs

    p = SAMPLERS_SECTION.validate(_params()["samplers"], "samplers")
    assert p["models"] == ["ve", "edm"]
    configs, skipped = method_configs(p, "edm")
    assert configs["dpm_solver_10"]["steps"] == 10 and configs["dpm_solver_20"]["steps"] == 20
    assert configs["heun"]["num_steps"] == 18 and not skipped
    _, skipped = method_configs(p, "vp")
    assert set(skipped) == {"annealed_langevin"}
    bad = {**_params()["samplers"], "models": ["ve", "ddpm"]}
    with pytest.raises(ParamsError, match=r"samplers\.models"):
        SAMPLERS_SECTION.validate(bad, "samplers")


def test_few_step_verdict_compares_best_fast_and_best_slow_sampler():
    from pipeline.report_sections import few_step_verdict

    def q(fid, std, nfe):
        keys = quality_keys("digits_cnn", 64)
        return {keys["fid"]: fid, keys["fid_std"]: std, "extractors": ["digits_cnn"], "n": 64, "nfe": nfe}

    entries = {"pc": q(20.0, 1.0, 2000), "reverse_diffusion": q(22.0, 1.0, 1000), "heun": q(21.0, 1.0, 35),
               "dpm_solver_10": q(30.0, 1.0, 10), "ode": q(19.0, 1.0, 400)}
    line = few_step_verdict("ve", entries, ["digits_cnn"])
    assert "heun (FID 21)" in line and "pc (FID 20)" in line and "+5.0%" in line and "within 10%" in line
    assert "not distinguishable" in line
    entries["heun"] = q(40.0, 1.0, 35)
    line = few_step_verdict("ve", entries, ["digits_cnn"])
    assert "dpm_solver_10 (FID 30)" in line and "not within" in line and "significant" in line
    assert few_step_verdict("ve", {"pc": q(20.0, 1.0, 2000)}, ["digits_cnn"]) is None
