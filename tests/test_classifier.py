"""The FID feature extractor must be able to classify: >= 0.95 held-out accuracy on the real digits.

The stage test runs the real `prepare` and `classifier` stages with the repository's default params
on scikit-learn's digits, in a temporary folder with a temporary SQLite MLflow store.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from scoresde.classifier import ClassifierConfig, SmallCNN, accuracy, build_classifier, train_classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_features_and_logits_shapes(shape):
    c, h, w = shape
    model = SmallCNN(ClassifierConfig(in_channels=c, image_size=(h, w), feature_dim=16)).eval()
    feats, logits = model.features(torch.rand(5, c, h, w))
    assert feats.shape == (5, 16) and logits.shape == (5, 10)
    # Other channel counts / sizes are mapped to the model's (torch-fidelity hands over 3 channels).
    feats3, _ = model.features(torch.rand(2, 3 if c == 1 else 1, h + 3, w + 3))
    assert feats3.shape == (2, 16) and torch.isfinite(feats3).all()


def test_grey_replicated_to_rgb_gives_the_same_features():
    model = SmallCNN(ClassifierConfig()).eval()
    x = torch.rand(4, 1, 8, 8)
    a, _ = model.features(x)
    b, _ = model.features(x.expand(-1, 3, -1, -1))
    assert torch.allclose(a, b, atol=1e-6)


def test_training_is_reproducible_with_a_generator():
    x = torch.rand(64, 1, 8, 8)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    cfg = ClassifierConfig(num_classes=3, width=4, feature_dim=8)
    m1 = train_classifier(x, y, cfg, epochs=2, batch_size=16, generator=torch.Generator().manual_seed(0))
    m2 = train_classifier(x, y, cfg, epochs=2, batch_size=16, generator=torch.Generator().manual_seed(0))
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    rebuilt = build_classifier(cfg.to_dict(), m1.state_dict())
    assert torch.equal(rebuilt(x), m1(x))


def test_classifier_stage_on_real_digits(tmp_path, monkeypatch):
    """Default params (params.yaml), the real digits: held-out accuracy >= 0.95, weights_only checkpoint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    from stages import classifier, prepare

    threads = torch.get_num_threads()
    assert prepare.main([]) == 0
    assert classifier.main([]) == 0
    # the stages ran with params' cpu_threads and gave the caller its own thread count back
    assert torch.get_num_threads() == threads
    metrics = json.loads((tmp_path / "reports/metrics/classifier.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["extractor"] == "digits_cnn"
    assert metrics["accuracy"] >= 0.95, metrics
    assert metrics["n_test"] == 297
    ckpt = torch.load(tmp_path / "models/classifier.pt", map_location="cpu", weights_only=True)
    model = build_classifier(ckpt["config"], ckpt["model"])
    from scoresde.data import load_prepared

    test = load_prepared(tmp_path / "data/prepared/data.parquet", split="test")
    assert accuracy(model, test.x, test.labels) == pytest.approx(metrics["accuracy"])
    import mlflow

    runs = mlflow.search_runs(experiment_names=["scoresde-digits"], filter_string="tags.stage = 'classifier'")
    assert len(runs) == 1 and runs.iloc[0]["metrics.accuracy"] == pytest.approx(metrics["accuracy"])
