"""The comparison report, from real MLflow runs in a temporary SQLite store.

Two reproductions (run groups) are logged through MLflow the way the stages log them (parent run +
nested stage runs with the tags of pipeline.tracking); the report must read them back, fill every
table, mark what did not run, compare the groups, and be a self-contained HTML page that a real
headless browser renders (the chromium test is skipped where chromium is absent).
"""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "report-test"


def _png(color: str = "#4c72b0") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    ax.imshow([[0, 1], [1, 0]], cmap="gray")
    ax.set_facecolor(color)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _log_group(tmp_path: Path, group: str, stages: dict[str, dict], figures: dict[str, bytes] | None = None) -> None:
    import mlflow

    from pipeline.tracking import start_parent_run

    parent = start_parent_run(EXPERIMENT, group, terminate=True)
    exp_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    for dvc_stage, spec in stages.items():
        stage, _, sde = dvc_stage.partition("@")
        tags = {"stage": stage, "sde": sde if stage in ("train", "sample", "evaluate") else "none",
                "dvc_stage": dvc_stage, "run_group": group, "git_commit": f"{group}-commit", **spec.get("tags", {})}
        with mlflow.start_run(experiment_id=exp_id, run_name=dvc_stage, parent_run_id=parent, tags=tags):
            for step, value in spec.get("history", []):
                mlflow.log_metric("loss", value, step=step)
            if spec.get("metrics"):
                mlflow.log_metrics(spec["metrics"])
            if spec.get("params"):
                mlflow.log_params(spec["params"])
            for name, data in (figures or {}).items():
                if spec.get("figure") == name:
                    path = tmp_path / name
                    path.write_bytes(data)
                    mlflow.log_artifact(str(path), "figures")


def _full_group() -> dict[str, dict]:
    toy = {}
    for scores, (iid, lang, ann) in {"exact": (0.004, 0.29, 0.011), "learned": (0.004, 0.27, 0.03)}.items():
        for sampler, v in (("iid", iid), ("langevin", lang), ("annealed_langevin", ann)):
            toy[f"{scores}_mode_weight_error_{sampler}"] = v          # as stages/toy.py logs them
            toy[f"{scores}_sliced_wasserstein_{sampler}"] = v * 10
    stages = {
        "classifier": {"metrics": {"accuracy": 0.976}, "tags": {"extractor": "digits_cnn"}},
        "fid_ref": {"metrics": {"n_reference": 1500, "fid_digits_cnn_real_test_n297": 8.39},
                    "tags": {"extractor_message": "Inception-v3 weights unavailable (URLError); falling back"}},
        "train@ve": {"history": [(25, 1.0), (50, 0.5), (75, 0.3)], "metrics": {"final_loss": 0.3}},
        "evaluate@ve": {"metrics": {"fid_digits_cnn_n500": 41.5, "kid_digits_cnn_n500": 3.1, "nfe": 1000, "seconds": 12.0},
                        "tags": {"sampler": "pc", "checkpoint": "ema", "extractor": "digits_cnn",
                                 "extractor_fallback": "Inception-v3 weights unavailable (URLError)"}},
        "evaluate@vp": {"metrics": {"fid_digits_cnn_n500": 52.0, "kid_digits_cnn_n500": 4.2, "nfe": 500, "seconds": 6.0},
                        "tags": {"sampler": "pc", "checkpoint": "raw", "extractor": "digits_cnn"}},
        "sample@ve": {"metrics": {"nfe": 1000, "seconds": 12.0}, "figure": "samples_ve.png"},
        "toy": {"metrics": toy, "figure": "toy_exact.png"},
        "ablation@0.1": {"metrics": {"fid_digits_cnn_n500": 90.0, "sigma_end": 0.1}, "tags": {"sigma_end": "0.1"}},
        "ablation@0.01": {"metrics": {"fid_digits_cnn_n500": 45.0}},  # sigma_end from the stage name
        "samplers": {"metrics": {"pc_fid_digits_cnn_n500": 40.0, "pc_nfe": 1000, "pc_seconds": 20.0,
                                 "ode_fid_digits_cnn_n500": 48.0, "ode_nfe": 140, "ode_seconds": 4.0,
                                 "heun_fid_digits_cnn_n500": 47.0, "heun_nfe": 35, "heun_seconds": 1.0}},
        "annealing": {"metrics": {"langevin_fixed_sigma_fid_digits_cnn_n500": 160.0, "langevin_fixed_sigma_sigma": 0.01,
                                  "annealed_langevin_fid_digits_cnn_n500": 45.0}},
    }
    return stages


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Temporary SQLite MLflow store with two reproductions: an older full one, a newer partial one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    figs = {"samples_ve.png": _png(), "toy_exact.png": _png("#c44e52")}
    _log_group(tmp_path, "repro-old", _full_group(), figs)
    # The newer reproduction re-ran only evaluate@ve (DVC skipped the rest) and one stage failed.
    _log_group(tmp_path, "repro-new", {"evaluate@ve": {"metrics": {"fid_digits_cnn_n500": 30.25, "nfe": 1000, "seconds": 11.0},
                                                       "tags": {"sampler": "pc", "checkpoint": "ema",
                                                                "extractor": "digits_cnn"}}})
    return tmp_path


def test_report_tables_from_mlflow(store):
    from pipeline.report import NOT_RUN, generate

    md, page = generate(EXPERIMENT, None, store / "out", figures_dir=None)
    text = md.read_text()
    # The newest group is the report's own; unchanged stages are carried over and marked.
    assert "| run group | repro-new |" in text
    assert "| ve | 500 | 30.25 |" in text and "| vp | 500* | 52* | 4.2* |" in text
    assert "| git commit | repro-new-commit |" in text
    assert re.search(r"\| ncsn \| " + NOT_RUN, text) and re.search(r"\| subvp \| " + NOT_RUN, text)
    # Toy claims checked from the logged numbers.
    assert "| annealed Langevin, exact scores: mode weight error <= 0.02 | 0.011 | holds |" in text
    assert "| plain Langevin, learned scores: mode weight error > 0.15 | 0.27 | holds |" in text
    assert "| sigma_end 0.1 gives worse samples (higher FID) than 0.01 / 0.001 | 90 vs 45 | holds |" in text
    # Ablation: sigma_end parsed from the dvc stage name; 0.001 never ran.
    assert re.search(r"\| 0\.001 \| " + NOT_RUN, text)
    # Samplers / annealing tables: one row per sampler from "<row>/<metric>" names.
    assert re.search(r"\| heun \| 47\*? \| 35\*? \| 1\*? \|", text), text
    assert re.search(r"\| langevin_fixed_sigma \| 160\*? \|", text) and re.search(r"\| annealed_langevin \| 45\*? \|", text)
    assert "| samplers | heun_fid_digits_cnn_n500 | 47* | 47 | 0 |" in text
    # Comparison: both groups, with the change of the re-run stage.
    assert "| evaluate@ve | fid_digits_cnn_n500 | 30.25 | 41.5 | -11.25 |" in text
    assert "classifier test accuracy (digits_cnn) | 0.976*" in text


def test_report_html_is_self_contained(store):
    from pipeline.report import generate

    _, page = generate(EXPERIMENT, None, store / "out", figures_dir=None)
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", html)
    assert "@import" not in html and "url(" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # Plots drawn here (FID per SDE, loss, ablation, samplers cost, across groups) + the two logged figures.
    assert len(images) >= 7
    import base64

    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "samples_ve.png" in html and "toy_exact.png" in html


def test_report_cli_selected_runs_and_errors(store, capsys):
    from pipeline.report import main

    assert main(["--experiment", EXPERIMENT, "--runs", "repro-old", "--out", str(store / "old")]) == 0
    text = (store / "old" / "report.md").read_text()
    assert "| run group | repro-old |" in text and "30.25" not in text and "41.5" in text
    assert main(["--experiment", EXPERIMENT, "--runs", "nope", "--out", str(store / "x")]) == 1
    assert "run groups not found" in capsys.readouterr().err
    assert main(["--experiment", "no-such-experiment", "--out", str(store / "x")]) == 1


def test_empty_experiment_reports_not_run(store):
    import mlflow

    from pipeline.report import generate

    mlflow.set_experiment("empty-exp")
    md, page = generate("empty-exp", None, store / "empty", figures_dir=None)
    assert "not run" in md.read_text() and page.exists()


def test_parse_metric_layouts():
    from pipeline.report import parse_toy, split_metric

    vals = parse_toy({"exact.mode_weight_error.annealed_langevin": 0.01, "learned_sliced_wasserstein_iid": 0.2,
                      "mode_weight_error/learned/langevin": 0.3, "seconds": 3.0})
    assert vals == {("exact", "mode_weight_error", "annealed_langevin"): 0.01,
                    ("learned", "sliced_wasserstein", "iid"): 0.2,
                    ("learned", "mode_weight_error", "langevin"): 0.3}
    assert split_metric("pc/fid_x_n5") == ("pc", "fid_x_n5")
    assert split_metric("fid_x_n5.ode") == ("ode", "fid_x_n5")
    assert split_metric("nfe") == ("", "nfe")


def _chromium() -> str | None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from screenshot_report import find_chromium
    finally:
        sys.path.pop(0)
    return find_chromium()


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(store):
    from PIL import Image

    from pipeline.report import generate

    _, page = generate(EXPERIMENT, None, store / "out", figures_dir=None)
    shot = store / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(page), "--out", str(shot),
                           "--size", "1280,2400"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 2400)
    lo, hi = img.getextrema()
    assert hi - lo > 100                                  # not a blank page
    hist = img.histogram()
    dark = sum(hist[:128]) / (img.size[0] * img.size[1])
    assert 0.005 < dark < 0.6                             # text and tables drawn, not an all-black page
    # The embedded plots rendered: some strongly coloured (non-grey) pixels exist.
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    coloured = int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())
    assert coloured > 50
