"""FID / KID through torch-fidelity with our classifier as the feature extractor.

- our torch-fidelity call agrees with a direct computation from means and covariances (and, for KID,
  with the unbiased polynomial-kernel MMD^2) on the same features;
- the reference comes from the cache written by fid_ref, never from re-reading the real images;
- offline without Inception weights, torch-fidelity's download fails and we fall back, saying so;
- the fid_ref / evaluate stages end to end on the real digits (and on toy points), with MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import fidelity as fd
from scoresde.classifier import ClassifierConfig, train_classifier

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"  # port 9: connection refused


@pytest.fixture(scope="module")
def digits():
    from scoresde.datasets import load_digits

    ds = load_digits()
    train = torch.from_numpy(ds.x[ds.split == "train"])
    test = torch.from_numpy(ds.x[ds.split == "test"])
    labels = torch.from_numpy(ds.labels[ds.split == "train"])
    return train, labels, test


@pytest.fixture(scope="module")
def extractor(digits):
    train, labels, _ = digits
    model = train_classifier(train[:600].float() / 255, labels[:600], ClassifierConfig(width=8, feature_dim=32),
                             epochs=2, generator=torch.Generator().manual_seed(0))
    return fd.register_classifier("test_digits_cnn", model), model


def _direct_features(model, u8: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.features(u8.float() / 255.0)[0].double().numpy()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    try:
        from scoresde.metrics import feature_statistics, frechet_distance
    except ImportError:  # pragma: no cover - the library module is written by someone else
        from scipy import linalg

        def feature_statistics(f):
            return f.mean(0), np.cov(f, rowvar=False)

        def frechet_distance(m1, s1, m2, s2):
            covmean = linalg.sqrtm(s1 @ s2).real
            return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = len(x)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_and_kid_match_direct_computation(digits, extractor):
    train, _, test = digits
    name, model = extractor
    n = len(test)                                            # 297: reference, samples and KID subsets alike
    ref = fd.reference_statistics(train[:n], name)
    out = fd.compute_fid_kid(test, ref, name, n, kid_subsets=3, kid_subset_size=n)
    assert set(out) == {f"fid_{name}_n{n}", f"kid_{name}_n{n}", f"kid_std_{name}_n{n}"}
    f_ref, f_test = _direct_features(model, train[:n]), _direct_features(model, test)
    assert np.allclose(ref.features, f_ref, rtol=1e-4, atol=1e-4)
    assert out[f"fid_{name}_n{n}"] == pytest.approx(_frechet(f_test, f_ref), rel=1e-3)
    # Subsets of the full size are permutations: KID is exactly the unbiased MMD^2 of the full sets.
    assert out[f"kid_{name}_n{n}"] == pytest.approx(_mmd2_unbiased_poly(f_test, f_ref), rel=1e-3, abs=1e-4)
    assert out[f"kid_std_{name}_n{n}"] == pytest.approx(0.0, abs=1e-3 * max(1.0, abs(out[f"kid_{name}_n{n}"])))
    # Worse samples (noise) score far worse.
    noise = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert fd.compute_fid_kid(noise, ref, name, kid_subset_size=100)[f"fid_{name}_n{n}"] > 5 * out[f"fid_{name}_n{n}"]


def test_reference_is_read_from_the_cache_not_recomputed(digits, extractor, tmp_path):
    train, _, test = digits
    name, _ = extractor
    ref = fd.reference_statistics(train, name)
    path = tmp_path / "ref.npz"
    fd.save_references(path, [ref], kind=np.array("image"))
    loaded, extra = fd.load_references(path)
    assert str(extra["kind"]) == "image" and np.array_equal(loaded[name].features, ref.features)
    assert loaded[name].mu.dtype == np.float32 and loaded[name].sigma.dtype == np.float64  # torch-fidelity's dtypes
    base = fd.compute_fid_kid(test, loaded[name], name, kid_subset_size=200)
    # The input2 Dataset refuses to be read (it raised nothing, so the cache served it); a doctored cache
    # changes the result exactly as the statistics say.
    shifted = fd.Reference(name, ref.layer, ref.features, ref.mu + np.float32(1.0), ref.sigma)
    moved = fd.compute_fid_kid(test, shifted, name, kid_subset_size=200)[f"fid_{name}_n{len(test)}"]
    f_test = fd.extract_features(test, name).astype(np.float64)
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    s = fid_features_to_statistics(torch.from_numpy(f_test.astype(np.float32)))
    expected = fid_statistics_to_metric(s, {"mu": shifted.mu, "sigma": shifted.sigma}, False)["frechet_inception_distance"]
    assert moved == pytest.approx(expected, rel=1e-6)
    assert moved != pytest.approx(base[f"fid_{name}_n{len(test)}"], rel=1e-3)
    with pytest.raises(RuntimeError, match="cache"):
        fd._CachedReference(3)[0]


def test_metric_names_and_uint8_dataset():
    assert fd.metric_names("digits_cnn", 500) == {"fid": "fid_digits_cnn_n500", "fid_std": "fid_digits_cnn_n500_std",
                                                  "kid": "kid_digits_cnn_n500", "kid_std": "kid_std_digits_cnn_n500"}
    assert fd.metric_names(fd.INCEPTION, 50000)["fid"] == "fid_inception_n50000"
    assert fd.extractor_name("cifar10") == "cifar10_cnn"
    ds = fd.UInt8Images(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    assert ds[0].shape == (3, 8, 8) and ds[0].dtype == torch.uint8
    with pytest.raises(ValueError):
        fd.UInt8Images(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="taken by torch-fidelity"):
        fd.register_classifier(fd.INCEPTION, torch.nn.Linear(1, 1))


def test_inception_falls_back_to_the_classifier_offline(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inc, "URL_INCEPTION_V3", UNREACHABLE)
    ok, weights, message = fd.resolve_inception(None, download=True)
    assert not ok and weights is None
    assert "download failed" in message and "URLError" in message and "falling back" in message
    ok, _, message = fd.resolve_inception(str(tmp_path / "missing.pth"))
    assert not ok and "does not exist" in message
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    ok, _, message = fd.resolve_inception(str(bad))
    assert not ok and "unusable" in message
    ok, _, message = fd.resolve_inception(None, download=False)
    assert not ok and "download disabled" in message


def _workspace(tmp_path: Path, monkeypatch, **overrides) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    monkeypatch.setattr(inc, "URL_INCEPTION_V3", UNREACHABLE)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *path, key = dotted.split(".")
        for p in path:
            node = node[p]
        node[key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return params


def _fake_samples(kind: str, x: np.ndarray) -> None:
    Path("data/samples").mkdir(parents=True, exist_ok=True)
    Path("reports/metrics").mkdir(parents=True, exist_ok=True)
    np.savez(f"data/samples/{kind}.npz", x=x)
    Path(f"reports/metrics/sample_{kind}.json").write_text(json.dumps(
        {"nfe": 123, "seconds": 4.5, "sampler": "pc", "n": len(x), "checkpoint": "ema"}))


def test_fid_ref_and_evaluate_stages_on_digits(tmp_path, monkeypatch):
    _workspace(tmp_path, monkeypatch, **{"classifier.epochs": 3, "classifier.min_accuracy": 0.0})
    from stages import classifier, evaluate, fid_ref, prepare

    assert prepare.main([]) == 0 and classifier.main([]) == 0
    assert fid_ref.main([]) == 0
    ref = json.loads(Path("reports/metrics/fid_ref.json").read_text())
    assert ref["extractors"] == ["digits_cnn"] and "URLError" in ref["extractor_message"]
    floor = ref["fid_digits_cnn_real_test_n297"]
    assert 0 < floor < 100

    from scoresde.data import load_prepared, to_uint8

    test_u8 = to_uint8(load_prepared("data/prepared/data.parquet", split="test").x).numpy()
    _fake_samples("ve", test_u8)
    # evaluate must not recompute the reference (nor read the real images through torch-fidelity).
    monkeypatch.setattr(fd, "reference_statistics", lambda *a, **k: pytest.fail("reference recomputed"))
    extract = fd.extract_features
    seen = []  # the FID bootstrap extracts the *samples'* features once; never the reference's

    def samples_only(images, *a, **k):
        seen.append(len(images))
        if len(images) != len(test_u8):
            pytest.fail("reference recomputed")
        return extract(images, *a, **k)

    monkeypatch.setattr(fd, "extract_features", samples_only)
    assert evaluate.main(["--sde", "ve"]) == 0
    assert seen == [len(test_u8)]
    out = json.loads(Path("reports/metrics/evaluate_ve.json").read_text())
    # The same real test images against the same reference: evaluate reproduces fid_ref's floor.
    assert out["fid_digits_cnn_n297"] == pytest.approx(floor, rel=1e-6)
    assert {"kid_digits_cnn_n297", "kid_std_digits_cnn_n297", "fid_digits_cnn_n297_std"} <= set(out)
    assert 0 < out["fid_digits_cnn_n297_std"] < out["fid_digits_cnn_n297"]
    assert (out["nfe"], out["seconds"], out["sampler"], out["checkpoint"]) == (123, 4.5, "pc", "ema")
    assert out["extractor"] == "digits_cnn" and "URLError" in out["extractor_fallback"]

    import mlflow

    run = mlflow.search_runs(experiment_names=["scoresde-digits"], filter_string="tags.dvc_stage = 'evaluate@ve'").iloc[0]
    assert run["metrics.fid_digits_cnn_n297"] == pytest.approx(floor, rel=1e-6)
    assert run["metrics.nfe"] == 123
    assert (run["tags.extractor"], run["tags.checkpoint"], run["tags.sampler"]) == ("digits_cnn", "ema", "pc")
    assert "URLError" in run["tags.extractor_fallback"]

    # Samples of the wrong shape are refused with a message, not a traceback from torch.
    _fake_samples("vp", np.zeros((10, 3, 32, 32), dtype=np.uint8))
    with pytest.raises(SystemExit, match="re-run the sample stage"):
        evaluate.main(["--sde", "vp"])


def test_toy_evaluation_uses_sliced_wasserstein_and_mode_weights(tmp_path, monkeypatch):
    params = _workspace(tmp_path, monkeypatch, **{"prepare.dataset": "toy", "prepare.toy.n": 2000})
    from stages import classifier, evaluate, fid_ref, prepare

    assert prepare.main([]) == 0 and classifier.main([]) == 0
    assert "skipped" in json.loads(Path("reports/metrics/classifier.json").read_text())
    assert fid_ref.main([]) == 0
    from scoresde.toy import GaussianMixture

    toy = params["prepare"]["toy"]
    mixture = GaussianMixture(toy["weights"], toy["means"], toy["std"])
    good = mixture.sample(1000, generator=torch.Generator().manual_seed(5)).numpy().astype(np.float32)
    one_mode = (np.random.default_rng(0).normal(size=(1000, 2)) + np.array(toy["means"][0])).astype(np.float32)
    _fake_samples("ve", good)
    _fake_samples("vp", one_mode)
    assert evaluate.main(["--sde", "ve"]) == 0 and evaluate.main(["--sde", "vp"]) == 0
    ve = json.loads(Path("reports/metrics/evaluate_ve.json").read_text())
    vp = json.loads(Path("reports/metrics/evaluate_vp.json").read_text())
    assert ve["mode_weight_error_n1000"] < 0.05
    assert vp["mode_weight_error_n1000"] == pytest.approx(1 - toy["weights"][0], abs=0.01)
    assert vp["sliced_wasserstein_n1000"] > 3 * ve["sliced_wasserstein_n1000"]


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file in torch-fidelity's Inception-v3 format (random weights: no download, same code path)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    mp = pytest.MonkeyPatch()
    mp.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None, raising=False)
    try:
        torch.manual_seed(0)
        model = inc.FeatureExtractorInceptionV3(fd.INCEPTION, [fd.INCEPTION_LAYER])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_inception_path_with_a_weights_file(digits, inception_weights):
    """evaluate.inception_weights set: Inception-v3 features (299x299, 2048-d), metric names say 'inception'."""
    train, _, test = digits
    ok, weights, message = fd.resolve_inception(inception_weights)
    assert ok and weights == inception_weights, message
    ref = fd.reference_statistics(train[:40], fd.INCEPTION, weights_path=weights, batch_size=20)
    assert ref.features.shape == (40, 2048) and ref.layer == "2048"
    out = fd.compute_fid_kid(test[:30], ref, fd.INCEPTION, 30, kid_subsets=5, weights_path=weights, batch_size=30)
    assert set(out) == {"fid_inception_n30", "kid_inception_n30", "kid_std_inception_n30"}
    assert np.isfinite(out["fid_inception_n30"]) and out["fid_inception_n30"] > 0


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_inception_weights_file_is_refused_not_executed(tmp_path):
    """torch-fidelity unpickles weights with weights_only=False: our resolver vets the file first."""
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "weights-inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": _Evil(sentinel)}, bad)
    ok, weights, message = fd.resolve_inception(str(bad), download=False)
    assert not ok and weights is None
    assert "UnsafeWeightsError" in message and str(bad) in message and "classifier" in message
    assert not sentinel.exists()
