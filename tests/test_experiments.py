"""The article's experiments as stages: toy (Fig 1), annealing (Figs 2/3), ablation (Fig 4), samplers.

The claim of Figure 1 is asserted twice: on the exact-score samplers with fewer points (fast), and on the
real toy stage output with the default params (slow, ~40 s). The image stages are checked end to end on
tiny 2-D models (the same code path as images, with the toy reference of the fid_ref stage) and their FID
plumbing on a few 8x8 images with an untrained classifier.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import claims
from pipeline.params import ParamsError, load_stage_params, validate
from pipeline.tracking import NullRun

ROOT = Path(__file__).resolve().parents[1]
TOY_MIXTURE = {"weights": [0.8, 0.2], "means": [[5.0, 5.0], [-5.0, -5.0]], "std": 1.0}


def default_params(schema) -> dict:
    return load_stage_params(schema, ROOT / "params.yaml")


# ------------------------------------------------------------------------------------ toy (Fig 1)
def test_toy_exact_scores_show_the_article_claim():
    """Annealing recovers the 0.8 / 0.2 weights; plain Langevin splits the points about evenly."""
    from pipeline import toy
    from scoresde.metrics import mode_weight_error

    p = default_params({"toy": toy.TOY})["toy"]
    p = {**p, "n": 3000}
    mixture = toy.make_mixture(p)
    g = torch.Generator().manual_seed(0)
    samples = toy.run_samplers(mixture.score, mixture.ncsn_score(), p, p["n"], g, mixture)
    err = {k: mode_weight_error(x, mixture) for k, x in samples.items()}
    assert err["iid"] < 0.03
    assert err["annealed_langevin"] < 0.035  # 0.02 at 10k points (slow test); 3k points add sampling noise
    assert err["langevin"] > claims.PLAIN_LANGEVIN_MIN
    assert all(torch.isfinite(x).all() for x in samples.values())


def test_toy_metrics_layout_and_figure(tmp_path):
    from pipeline import toy

    p = default_params({"toy": toy.TOY})["toy"]
    p = {**p, "n": 200, "n_steps_each": 5, "train": {**p["train"], "steps": 3, "log_every": 1, "n_data": 100}}
    mixture = toy.make_mixture(p)
    g = torch.Generator().manual_seed(0)
    samples = toy.run_samplers(mixture.score, mixture.ncsn_score(), p, 200, g, mixture)
    metrics = toy.sample_metrics(samples, mixture, mixture.sample(200, generator=g), 16, 0)
    assert set(metrics) == {"mode_weight_error", "sliced_wasserstein"}
    for d in metrics.values():
        assert set(d) == {"iid", "langevin", "annealed_langevin"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in d.values())
    flat = toy.flat_metrics({"exact": metrics})
    assert "exact_mode_weight_error_annealed_langevin" in flat
    model, seconds, loss = toy.train_score_net(p, mixture, 0, NullRun(), ckpt_dir=str(tmp_path / "ckpt"))
    assert np.isfinite(loss) and not model.training
    out = tmp_path / "fig.png"
    toy.plot_panels(mixture, samples, mixture.score, "test", str(out), p)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, field", [
    ({"weights": [0.7, 0.2]}, "toy.weights"),
    ({"sigma_end": 30.0}, "toy.sigma_end"),
    ({"means": [[5.0, 5.0, 1.0], [-5.0, -5.0, 1.0]]}, "toy.means"),
    ({"n_stepz": 3}, "toy.n_stepz"),
])
def test_toy_params_are_validated(change, field):
    from pipeline import toy

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["toy"].update(change)
    with pytest.raises(ParamsError) as err:
        validate({"toy": toy.TOY}, raw)
    assert err.value.path == field


def _stage_env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
               OMP_NUM_THREADS="1", SCORESDE_RUN_GROUP="test-experiments")
    return env


def test_toy_stage_rejects_bad_params_before_work(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["toy"]["num_levels"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "stages.toy"], cwd=tmp_path, env=_stage_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "toy.num_levels" in out.stderr
    assert not (tmp_path / "reports").exists()


@pytest.mark.slow
def test_toy_stage_default_params_reproduce_figure_1(tmp_path):
    """The real stage, default params: annealed Langevin within 0.02 (exact) / 0.05 (learned), plain Langevin off by > 0.15."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    out = subprocess.run([sys.executable, "-m", "stages.toy"], cwd=tmp_path, env=_stage_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "reports/metrics/toy.json").read_text())
    assert set(m) == {"exact", "learned"}
    for kind in ("exact", "learned"):
        assert set(m[kind]) == {"mode_weight_error", "sliced_wasserstein"}
        for metric in m[kind].values():
            assert set(metric) == {"iid", "langevin", "annealed_langevin"}
    assert m["exact"]["mode_weight_error"]["annealed_langevin"] <= claims.ANNEALED_EXACT_MAX
    assert m["learned"]["mode_weight_error"]["annealed_langevin"] <= claims.ANNEALED_LEARNED_MAX
    assert m["exact"]["mode_weight_error"]["langevin"] > claims.PLAIN_LANGEVIN_MIN
    assert m["learned"]["mode_weight_error"]["langevin"] > claims.PLAIN_LANGEVIN_MIN
    rows = claims.evaluate({"toy": m})  # the report's verdicts on the same numbers
    assert all(r.verdict == claims.HOLDS for r in rows if r.claim.figure == "Figure 1")
    # i.i.d. samples are the floor of the sliced Wasserstein distance; plain Langevin is far above it
    for kind in ("exact", "learned"):
        sw = m[kind]["sliced_wasserstein"]
        assert sw["iid"] < sw["annealed_langevin"] < sw["langevin"]
    for name in ("toy_exact.png", "toy_learned.png"):
        assert (tmp_path / "reports/figures" / name).stat().st_size > 10_000


# ------------------------------------------------------------- tiny 2-D "pipeline" for the other stages
@pytest.fixture
def toy_workspace(tmp_path, monkeypatch):
    """A working directory with what the image stages read, for the toy data: prepared points, a schedule,
    the fid_ref stage's points reference, and small random VE / VP / NCSN score MLPs saved as the train
    stage saves them."""
    from scoresde.datasets import get_dataset
    from scoresde.ema import EMA
    from scoresde.models import build_model
    from scoresde.checkpoint import save_model
    from pipeline.schedule import build_schedule

    monkeypatch.chdir(tmp_path)
    ds = get_dataset("toy", **TOY_MIXTURE, n=300, n_test=0, seed=0)
    ds.write("data/prepared/data.parquet", meta={"seed": 0})
    x = torch.as_tensor(ds.x, dtype=torch.float32)
    noise = {"sigma_begin": 20.0, "sigma_end": 1.0, "num_levels": 4, "n_examples": 2,
             "ve": {"sigma_min": 0.5, "sigma_max": "auto"},
             "vp": {"beta_min": 0.1, "beta_max": 20.0}, "subvp": {"beta_min": 0.1, "beta_max": 20.0}}
    schedule = build_schedule(noise, x)
    Path("data/noise").mkdir(parents=True)
    Path("data/noise/schedule.json").write_text(json.dumps(schedule))
    Path("data/fid").mkdir(parents=True)
    with open("data/fid/ref_stats.npz", "wb") as fh:
        np.savez(fh, kind=np.array("points"), dataset=np.array("toy"), points=x.numpy(),
                 mixture_weights=np.array(TOY_MIXTURE["weights"]), mixture_means=np.array(TOY_MIXTURE["means"]),
                 mixture_std=np.array(TOY_MIXTURE["std"]))
    for kind, emb in (("ncsn", "fourier"), ("ve", "fourier"), ("vp", "sinusoidal")):
        cfg = {"name": "mlp", "hidden": 16, "n_layers": 1, "embedding": emb}
        model = build_model(cfg, (2,), seed=0)
        info = {"kind": kind, "centered": False, "model": cfg, "data_shape": [2], "dataset": "toy"}
        save_model(f"models/{kind}.pt", model, EMA(model), info)
    return tmp_path


def _with(params: dict, section: str, **changes) -> dict:
    out = json.loads(json.dumps(params))
    for key, value in changes.items():
        node = out[section]
        *path, last = key.split("__")
        for k in path:
            node = node[k]
        node[last] = value
    return out


def test_annealing_stage_on_a_tiny_model(toy_workspace):
    from stages import annealing

    params = _with(default_params(annealing.SCHEMA), "annealing", n=32, batch_size=16, n_steps_each=3, device="cpu")
    annealing.run(params, NullRun(), None)
    m = json.loads(Path(annealing.METRICS).read_text())
    assert set(m) == {"langevin_fixed_sigma", "annealed_langevin"}
    for r in m.values():
        assert r["nfe"] >= 4 * 3 and r["n"] == 32 and r["extractors"] == ["points"]
        assert "sliced_wasserstein_n32" in r and "mode_weight_error_n32" in r
    assert m["langevin_fixed_sigma"]["nfe"] == 4 * 3  # the same budget for both (+1 Tweedie step when annealed)
    assert m["annealed_langevin"]["nfe"] == 4 * 3 + 1
    assert m["langevin_fixed_sigma"]["sigma"] == pytest.approx(1.0)
    assert Path(annealing.FIGURE).stat().st_size > 1000


def test_ablation_schedule_and_names():
    from pipeline import ablation
    from pipeline.schedule import ablation_schedule

    schedule = {"sigma_begin": 4.8, "sigmas": [4.8, 0.01], "num_levels": 2, "sigma_end": 0.01}
    s = ablation_schedule(schedule, 0.001, 10)
    assert len(s["sigmas"]) == 10 and s["sigmas"][0] == pytest.approx(4.8) and s["sigmas"][-1] == pytest.approx(0.001)
    ratios = np.array(s["sigmas"][:-1]) / np.array(s["sigmas"][1:])
    assert np.allclose(ratios, ratios[0])  # log-spaced
    with pytest.raises(ParamsError):
        ablation_schedule(schedule, 5.0, 10)
    # file names follow DVC's rendering of ${item} for the default values (dvc.yaml lists them)
    sigma_ends = default_params({"ablation": ablation.ABLATION})["ablation"]["sigma_ends"]
    dvc = (ROOT / "dvc.yaml").read_text()
    for v in sigma_ends:
        assert ablation.metrics_path(ablation.value_name(v)) in dvc


def test_ablation_stage_and_summary_on_a_tiny_model(toy_workspace):
    from pipeline.ablation import PLOT, SUMMARY_FIGURE, figure_path, metrics_path
    from stages import ablation, ablation_summary

    params = default_params(ablation.SCHEMA)
    a = params["ablation"]
    a.update(device="cpu", num_levels=3, n_show=16)
    a["train"].update(steps=4, batch_size=32, warmup=0, log_every=2, ckpt_every=100,
                      model={"name": "mlp", "embedding": "fourier", "hidden": 16, "n_layers": 1})
    a["sample"].update(n=24, batch_size=24, n_steps_each=2)
    a["sigma_ends"] = [0.1, 0.01]
    for v in a["sigma_ends"]:
        ablation.run(params, NullRun(), type("Args", (), {"sigma_end": str(v)})())
        m = json.loads(Path(metrics_path(str(v))).read_text())
        assert m["sigma_end"] == v and m["num_levels"] == 3 and m["train_steps"] == 4
        assert "sliced_wasserstein_n24" in m and m["nfe"] == 3 * 2
        assert Path(figure_path(str(v))).exists()
    ablation_summary.run(params, NullRun(), None)
    lines = Path(PLOT).read_text().splitlines()
    assert lines[0].startswith("sigma_end,fid,fid_std,kid")
    assert [float(l.split(",")[0]) for l in lines[1:]] == [0.1, 0.01]
    assert Path(SUMMARY_FIGURE).exists()


def test_samplers_configs_and_table():
    from pipeline import cost
    from stages import samplers

    p = default_params(samplers.SCHEMA)["samplers"]
    configs, skipped = cost.method_configs(p, "ve")
    assert configs["reverse_diffusion"]["corrector"] == "none"
    assert configs["pc"]["steps"] == 1000
    assert configs["heun"]["num_steps"] == 18 and not skipped
    _, skipped = cost.method_configs(p, "vp")
    assert set(skipped) == {"annealed_langevin"}
    rows = cost.table_rows({"heun": {"fid_digits_cnn_n200": 10.0, "fid_digits_cnn_n200_std": 0.5,
                                     "kid_digits_cnn_n200": 0.1, "kid_std_digits_cnn_n200": 0.01, "nfe": 35,
                                     "seconds": 1.5, "seconds_per_1000": 7.5, "extractors": ["digits_cnn"], "n": 200},
                            "annealed_langevin": {"skipped": "needs VE"}}, "ve")
    assert rows[0]["fid"] == 10.0 and rows[0]["kid"] == 0.1 and rows[0]["nfe"] == 35
    assert rows[0]["fid_std"] == 0.5 and rows[0]["model"] == "ve"
    assert rows[0]["metric"] == "fid_digits_cnn_n200"
    table = cost.markdown_table(rows, "ve", 200)
    assert "| heun | 10 ± 0.5 | 0.1 | 35 | 1.5 |" in table and "skipped" in table
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["samplers"]["run"] = ["pc", "euler"]
    with pytest.raises(ParamsError, match=r"samplers.run\[1\]"):
        validate(samplers.SCHEMA, raw)


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_samplers_stage_on_a_tiny_model(toy_workspace, sde):
    from argparse import Namespace

    from stages import samplers

    params = default_params(samplers.SCHEMA)
    p = params["samplers"]
    p.update(models=[sde], n=16, batch_size=16, device="cpu")
    p["dpm_solver_10"]["steps"] = 3
    p["dpm_solver_20"]["steps"] = 4
    p["pc"]["steps"] = 10
    p["reverse_diffusion"]["steps"] = 10
    p["ode"].update(rtol=1e-3, atol=1e-3)
    p["heun"]["num_steps"] = 4
    p["annealed_langevin"]["n_steps_each"] = 2
    samplers.run(params, NullRun(), Namespace(sde=sde))
    m = json.loads(Path(samplers.METRICS.format(sde)).read_text())
    assert m["sde"] == sde
    assert m["pc"]["nfe"] == 20 and m["reverse_diffusion"]["nfe"] == 10 and m["heun"]["nfe"] == 7
    assert m["dpm_solver_10"]["nfe"] == 3 and m["dpm_solver_20"]["nfe"] == 4
    assert m["ode"]["nfe"] > 0
    for name in ("pc", "reverse_diffusion", "ode", "heun"):
        assert m[name]["seconds"] >= 0 and "sliced_wasserstein_n16" in m[name]
    if sde == "ve":
        assert m["annealed_langevin"]["nfe"] == 4 * 2 + 1
    else:
        assert "skipped" in m["annealed_langevin"]
    assert Path(samplers.TABLE.format(sde)).read_text().startswith(f"# Samplers on the {sde.upper()} model")
    assert Path(samplers.FIGURE.format(sde)).exists() and Path(samplers.PLOT.format(sde)).exists()


def test_quality_metrics_on_images_uses_the_cached_reference(tmp_path):
    """FID plumbing of the image stages: an untrained classifier as extractor; a set against itself has FID ~ 0."""
    from pipeline import fidelity as fd
    from scoresde.classifier import ClassifierConfig, build_classifier
    from scoresde.data import to_uint8
    from pipeline.quality import sample_quality as quality_metrics

    cfg = ClassifierConfig.from_dict({"in_channels": 1, "image_size": [8, 8], "num_classes": 10, "width": 8,
                                      "feature_dim": 16})
    torch.manual_seed(0)  # the untrained extractor's weights: fixed, not whatever the global RNG holds
    model = build_classifier(cfg)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, tmp_path / "classifier.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.rand((64, 1, 8, 8), generator=g)
    name = fd.register_classifier(fd.extractor_name("digits"), model)
    ref = fd.reference_statistics(to_uint8(x), name)
    fd.save_references(tmp_path / "ref.npz", [ref], kind=np.array("image"), dataset=np.array("digits"),
                       shape=np.array([1, 8, 8]), extractor_message=np.array(""), inception_weights=np.array(""))
    same = quality_metrics(x, 0, "cpu", reference=str(tmp_path / "ref.npz"), classifier=str(tmp_path / "classifier.pt"))
    assert set(same) == {"fid_digits_cnn_n64", "fid_digits_cnn_n64_std", "kid_digits_cnn_n64", "kid_std_digits_cnn_n64",
                         "extractors", "n"}
    assert same["extractors"] == ["digits_cnn"] and same["n"] == 64
    assert 0 <= same["fid_digits_cnn_n64_std"]  # bootstrap spread of a set against itself: small, not negative
    # An untrained extractor's features are tiny (trace of their covariance ~1e-4): judge FIDs on that scale.
    spread = float(np.trace(ref.sigma))
    assert abs(same["fid_digits_cnn_n64"]) < 1e-6 * spread
    other = quality_metrics(torch.zeros_like(x) + 0.5, 0, "cpu", n=32, reference=str(tmp_path / "ref.npz"),
                            classifier=str(tmp_path / "classifier.pt"))
    assert other["fid_digits_cnn_n32"] > spread  # constant images sit farther off than the reference's own spread
