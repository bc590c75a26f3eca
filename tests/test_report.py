"""The comparison report, from real MLflow runs in a temporary SQLite store.

Reproductions (run groups) are logged through MLflow the way the stages log them: a parent run plus
nested stage runs with the tags of pipeline.tracking (``stage``, ``sde``, ``dvc_stage``, ``run_group``),
their numbers as metrics, and the stage's metrics JSON as an artifact under ``metrics/``. The report
must take its numbers from those JSON files (the tables show exactly the JSON values), check the
article's claims with :mod:`pipeline.claims`, mark what did not run, read the model kinds and σ_end
values from the params file, compare the groups, and be a self-contained HTML page that a real
headless browser renders (the chromium test is skipped where chromium is absent).
"""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import claims
from pipeline.quality import quality_keys, real_keys
from pipeline.report_render import CARRIED, NOT_RUN, fmt

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "report-test"
EXT, N = "digits_cnn", 500
KEYS = quality_keys(EXT, N)


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


def _quality(fid: float, kid: float, kid_std: float = 0.2, n: int = N, fid_std: float = 1.0) -> dict:
    keys = quality_keys(EXT, n)
    return {keys["fid"]: fid, keys["fid_std"]: fid_std, keys["kid"]: kid, keys["kid_std"]: kid_std,
            "extractors": [EXT], "n": n}


def _flat_numbers(data: dict, prefix: str = "") -> dict[str, float]:
    """The MLflow metrics a stage logs beside its JSON (numbers only, nested keys joined with ``_``)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}_"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def _log_group(tmp_path: Path, group: str, stages: dict[str, dict], experiment: str = EXPERIMENT) -> None:
    import mlflow

    from pipeline.tracking import start_parent_run

    parent = start_parent_run(experiment, group, terminate=True)
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    for dvc_stage, spec in stages.items():
        stage, _, item = dvc_stage.partition("@")
        sde = item if stage in ("train", "sample", "evaluate") else spec.get("sde", "none")
        tags = {"stage": stage, "sde": sde, "dvc_stage": dvc_stage, "run_group": group,
                "git_commit": f"{group}-commit", **spec.get("tags", {})}
        with mlflow.start_run(experiment_id=exp_id, run_name=dvc_stage, parent_run_id=parent, tags=tags):
            for step, value in spec.get("history", []):
                mlflow.log_metric("loss", value, step=step)
            data = spec.get("json")
            if data is not None:
                mlflow.log_metrics(_flat_numbers(data))
                if spec.get("artifact", True):
                    folder = tmp_path / "logged" / group
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{dvc_stage.replace('@', '_')}.json"
                    path.write_text(json.dumps(data, indent=2, sort_keys=True))
                    mlflow.log_artifact(str(path), "metrics")
            if spec.get("figure"):
                path = tmp_path / spec["figure"]
                path.write_bytes(_png(spec.get("color", "#4c72b0")))
                mlflow.log_artifact(str(path), "figures")


def _toy(exact_annealed: float = 0.011, learned_annealed: float = 0.03, exact_plain: float = 0.29,
         learned_plain: float = 0.27) -> dict:
    out = {}
    for scores, (iid, lang, ann) in {"exact": (0.004, exact_plain, exact_annealed),
                                     "learned": (0.004, learned_plain, learned_annealed)}.items():
        out[scores] = {"mode_weight_error": {"iid": iid, "langevin": lang, "annealed_langevin": ann},
                       "sliced_wasserstein": {"iid": iid * 10, "langevin": lang * 10, "annealed_langevin": ann * 10}}
    return out


def _full_group() -> dict[str, dict]:
    fallback = "Inception-v3 weights unavailable (URLError); falling back to the classifier"
    floor = real_keys(EXT, "test", 297)
    return {
        "classifier": {"json": {"accuracy": 0.976, "extractor": EXT, "dataset": "digits", "n_test": 297}},
        "fid_ref": {"json": {"dataset": "digits", "n_reference": 1500, "reference_split": "train", "extractors": [EXT],
                             "extractor_message": fallback, "real_split": "test", "n_real": 297,
                             floor["fid"]: 8.39, floor["kid"]: 0.4357, floor["kid_std"]: 0.17}},
        "train@ve": {"history": [(25, 1.0), (50, 0.5), (75, 0.3)],
                     "json": {"final_loss": 0.3, "steps": 75, "seconds": 5.5}},
        "evaluate@ve": {"json": {**_quality(41.5, 3.1), "nfe": 1000, "seconds": 12.0, "sampler": "pc",
                                 "checkpoint": "ema", "dataset": "digits", "extractor_fallback": fallback}},
        "evaluate@vp": {"json": {**_quality(52.0, 4.2), "nfe": 500, "seconds": 6.0, "sampler": "pc",
                                 "checkpoint": "raw", "dataset": "digits"}},
        "sample@ve": {"json": {"nfe": 1000, "seconds": 12.0, "n": N, "sampler": "pc", "checkpoint": "ema"},
                      "figure": "samples_ve.png"},
        "toy": {"json": _toy(), "figure": "toy_exact.png", "color": "#c44e52"},
        "ablation@0.1": {"json": {**_quality(90.0, 9.0), "sigma_end": 0.1, "nfe": 200, "seconds": 4.0,
                                  "train_steps": 400}, "tags": {"sigma_end": "0.1"}},
        "ablation@0.01": {"json": {**_quality(45.0, 2.0), "sigma_end": 0.01, "nfe": 200, "seconds": 5.0,
                                   "train_steps": 400}, "tags": {"sigma_end": "0.01"}},
        "samplers@ve": {"sde": "ve", "json": {
            "sde": "ve", "checkpoint": "ema",
            "pc": {**_quality(40.0, 2.5), "nfe": 1000, "seconds": 20.0, "seconds_per_1000": 40.0, "sampler": "pc"},
            "ode": {**_quality(48.0, 3.5), "nfe": 140, "seconds": 4.0, "seconds_per_1000": 8.0, "sampler": "ode"},
            "heun": {**_quality(47.0, 3.0), "nfe": 35, "seconds": 1.0, "seconds_per_1000": 2.0, "sampler": "heun"},
            "annealed_langevin": {"skipped": "annealed_langevin needs a σ-conditioned (VE) model, not vp"}}},
        "annealing": {"json": {"langevin_fixed_sigma": {**_quality(160.0, 20.0), "nfe": 200, "seconds": 4.0,
                                                        "sigma": 0.01},
                               "annealed_langevin": {**_quality(45.0, 2.0), "nfe": 201, "seconds": 5.0}}},
    }


def _params(path: Path, kinds=("ncsn", "ve", "vp", "subvp"), sigma_ends=(0.1, 0.01, 0.001)) -> Path:
    data = {"experiment": EXPERIMENT, "train": {"device": "auto", **{k: {"steps": 10} for k in kinds}},
            "ablation": {"sigma_ends": list(sigma_ends)}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Temporary SQLite MLflow store with two reproductions: an older full one, a newer partial one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    _params(tmp_path / "params.yaml")
    old = _full_group()
    _log_group(tmp_path, "repro-old", old)
    # The newer reproduction re-ran only evaluate@ve (DVC skipped the rest).
    new = {"evaluate@ve": {"json": {**_quality(30.25, 2.0, n=400), "nfe": 1000, "seconds": 11.0, "sampler": "pc",
                                    "checkpoint": "ema", "dataset": "digits"}}}
    _log_group(tmp_path, "repro-new", new)
    return tmp_path, old, new


def tables(md: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their first header cell + the section title: {"<section>/<first column>": rows}."""
    out, section, lines = {}, "", md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:]
        if line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split(" | ")])
            out.setdefault(f"{section}/{head[0]}", [head] + rows)
    return out


def row(table: list[list[str]], *first: str) -> list[str]:
    found = [r for r in table[1:] if r[:len(first)] == list(first)]
    assert found, f"no row {first} in {table}"
    return found[0]


def test_report_tables_equal_the_json(store):
    from pipeline.report import generate

    tmp, old, new = store
    md, _ = generate(EXPERIMENT, None, tmp / "out", figures_dir=None)
    text = md.read_text()
    t = tables(text)
    # The newest group is the report's own; unchanged stages are carried over and marked.
    assert "| run group | repro-new |" in text and "| git commit | repro-new-commit |" in text
    models = t["Per-model sample quality (evaluate@{kind})/model"]
    assert models[0][:7] == ["model", "extractor", "n", "fid", "fid_std", "kid", "kid_std"]
    ve, vp = new["evaluate@ve"]["json"], old["evaluate@vp"]["json"]
    keys400 = quality_keys(EXT, 400)
    assert row(models, "ve")[:12] == ["ve", EXT, "400", fmt(ve[keys400["fid"]]), fmt(ve[keys400["fid_std"]]),
                                      fmt(ve[keys400["kid"]]),
                                      fmt(ve[keys400["kid_std"]]), fmt(ve["nfe"]), fmt(ve["seconds"]), "pc", "ema",
                                      "digits"]
    assert row(models, "vp")[:9] == ["vp", EXT + CARRIED, f"{N}{CARRIED}"] + [
        fmt(vp[name]) + CARRIED for name in (KEYS["fid"], KEYS["fid_std"], KEYS["kid"], KEYS["kid_std"], "nfe",
                                             "seconds")]
    assert row(models, "vp")[-1] == "repro-old (earlier)"
    assert all(c == NOT_RUN for c in row(models, "ncsn")[1:]) and all(c == NOT_RUN for c in row(models, "subvp")[1:])
    assert "| ve | 75* | 0.3* | 5.5* |" in text          # train_ve.json: steps, final_loss, seconds
    # Reference: accuracy and the floor, named by real_keys(extractor, real_split, n_real).
    ref = old["fid_ref"]["json"]
    assert f"| classifier test accuracy ({EXT}, digits) | {fmt(0.976)}* |" in text
    floor = real_keys(EXT, ref["real_split"], ref["n_real"])["fid"]
    assert f"| real test vs reference: {floor} | {fmt(ref[floor])}* |" in text
    # Figure 1 table: exactly the toy.json values.
    toy = old["toy"]["json"]
    fig1 = t["Figure 1: toy mixture, Langevin with and without annealing (toy)/sampler"]
    for smp in ("iid", "langevin", "annealed_langevin"):
        assert row(fig1, smp)[1:] == [fmt(toy[s][m][smp]) + CARRIED for m in ("mode_weight_error", "sliced_wasserstein")
                                      for s in ("exact", "learned")]
    # Figures 2/3 and 4, samplers: rows from the JSON layouts.
    ann = old["annealing"]["json"]
    fig23 = t["Figures 2/3: fixed-sigma Langevin vs annealed Langevin (annealing)/sampler"]
    assert row(fig23, "langevin_fixed_sigma")[3] == fmt(ann["langevin_fixed_sigma"][KEYS["fid"]]) + CARRIED
    assert row(fig23, "langevin_fixed_sigma")[-1] == fmt(0.01) + CARRIED
    fig4 = t["Figure 4: ablation of the smallest noise level sigma_end (ablation)/sigma_end"]
    assert [r[0] for r in fig4[1:]] == ["0.1", "0.01", "0.001"]
    assert row(fig4, "0.1")[3] == "90*" and all(c == NOT_RUN for c in row(fig4, "0.001")[1:])
    smp = t["Samplers: quality against compute (samplers@{model})/sampler"]
    heun = old["samplers@ve"]["json"]["heun"]
    assert row(smp, "heun")[:4] == ["heun", EXT + CARRIED, f"{N}{CARRIED}", fmt(heun[KEYS["fid"]]) + CARRIED]
    assert row(smp, "heun")[-3:] == [fmt(heun["nfe"]) + CARRIED, fmt(heun["seconds"]) + CARRIED,
                                     fmt(heun["seconds_per_1000"]) + CARRIED]
    assert row(smp, "annealed_langevin")[1].startswith("skipped: annealed_langevin needs")
    # Claims: measured values are the JSON values, verdicts from pipeline.claims.
    cl = t["The article's claims, as measured/figure"]
    by_text = {r[1]: r for r in cl[1:]}
    assert len(by_text) == len(claims.CLAIMS)
    first = by_text[claims.CLAIMS[0].text]
    assert first[2:] == [fmt(toy["exact"]["mode_weight_error"]["annealed_langevin"]), claims.HOLDS]
    assert all(r[3] == claims.HOLDS for r in cl[1:]), cl
    fig4_claim = next(c for c in claims.CLAIMS if c.figure == "Figure 4")
    assert by_text[fig4_claim.text][2] == "90 vs 45"
    # Comparison: both groups; the change is computed from the numbers, not from the cells.
    assert f"| evaluate@ve | {keys400['fid']} | 30.25 | {NOT_RUN} |" in text
    assert f"| evaluate@ve | {KEYS['fid']} | {NOT_RUN} | 41.5 |" in text
    assert f"| samplers@ve | heun: {KEYS['fid']} | 47* | 47 | 0 |" in text
    assert f"| classifier | accuracy | {fmt(0.976)}* | {fmt(0.976)} | 0 |" in text


def test_claims_flip_to_fails_when_the_data_says_so(store):
    """A reproduction whose numbers break the claims shows FAILS (and the report still builds)."""
    from pipeline.report import generate

    tmp, old, _ = store
    bad = {"toy": {"json": _toy(exact_annealed=2 * claims.ANNEALED_EXACT_MAX,
                                learned_plain=claims.PLAIN_LANGEVIN_MIN / 2)},
           "annealing": {"json": {"langevin_fixed_sigma": _quality(30.0, 1.0),
                                  "annealed_langevin": _quality(31.0, 1.0)}},
           "ablation@0.001": {"json": {**_quality(95.0, 9.0), "sigma_end": 0.001}}}
    _log_group(tmp, "repro-bad", bad)
    md, _ = generate(EXPERIMENT, None, tmp / "bad", figures_dir=None)
    verdicts = {r[1]: (r[2], r[3]) for r in tables(md.read_text())["The article's claims, as measured/figure"][1:]}
    by_name = {c.name: c.text for c in claims.CLAIMS}
    assert verdicts[by_name["fig1_annealed_exact"]] == (fmt(2 * claims.ANNEALED_EXACT_MAX), claims.FAILS)
    assert verdicts[by_name["fig1_plain_learned"]] == (fmt(claims.PLAIN_LANGEVIN_MIN / 2), claims.FAILS)
    assert verdicts[by_name["fig1_annealed_learned"]][1] == claims.HOLDS
    assert verdicts[by_name["fig23_annealed_beats_fixed_sigma"]] == ("31 vs 30", claims.FAILS)
    # Figure 4: 0.1 (90, carried) against the best of 0.01 (45, carried) and 0.001 (95, this group): still holds.
    assert verdicts[by_name["fig4_large_sigma_end_worse"]] == ("90 vs 45", claims.HOLDS)


def test_claims_module_evaluates_structured_metrics():
    metrics = {"toy": _toy(exact_annealed=claims.ANNEALED_EXACT_MAX, exact_plain=claims.PLAIN_LANGEVIN_MIN),
               "annealing": None, "fid_ref": {"extractors": [EXT]},
               "ablation": {0.1: {KEYS["fid"]: 40.0, "n": N}, 0.001: {KEYS["fid"]: 50.0, "n": N}}}
    rows = {r.claim.name: r for r in claims.evaluate(metrics)}
    assert [r.claim.name for r in claims.evaluate(metrics)] == [c.name for c in claims.CLAIMS]
    assert rows["fig1_annealed_exact"].verdict == claims.HOLDS            # <= at the threshold
    assert rows["fig1_plain_exact"].verdict == claims.FAILS               # > is strict
    assert rows["fig1_plain_exact"].reference == claims.PLAIN_LANGEVIN_MIN
    assert rows["fig23_annealed_beats_fixed_sigma"].verdict == claims.NOT_RUN
    # extractors missing in the ablation dicts: fid_ref's list composes the name; 0.01 absent, 0.001 measured.
    assert (rows["fig4_large_sigma_end_worse"].value, rows["fig4_large_sigma_end_worse"].reference) == (40.0, 50.0)
    assert rows["fig4_large_sigma_end_worse"].verdict == claims.FAILS
    assert all(r.verdict == claims.NOT_RUN for r in claims.evaluate({}))
    with pytest.raises(ValueError):
        claims.Claim("x", "F", "t", ("toy",), "==", 1.0)


def test_kinds_and_sigma_ends_come_from_the_params_file(store):
    from pipeline.report import generate

    tmp, _, _ = store
    params = _params(tmp / "other.yaml", kinds=("ve", "edm"), sigma_ends=(0.5, 0.1))
    md, _ = generate(EXPERIMENT, None, tmp / "other", figures_dir=None, params=params)
    t = tables(md.read_text())
    models = [r[0] for r in t["Per-model sample quality (evaluate@{kind})/model"][1:]]
    assert models == ["ve", "edm", "vp"]                 # params order; vp ran, so it is shown after them
    assert all(c == NOT_RUN for c in row(t["Per-model sample quality (evaluate@{kind})/model"], "edm")[1:])
    fig4 = [r[0] for r in t["Figure 4: ablation of the smallest noise level sigma_end (ablation)/sigma_end"][1:]]
    assert fig4 == ["0.5", "0.1", "0.01"]                # 0.001 is neither in params nor run; 0.01 ran
    assert "ncsn" not in models and "subvp" not in models


def test_missing_stages_and_artifacts_show_not_run(tmp_path, monkeypatch):
    """Stages that never ran and runs without a metrics artifact show "not run"; the local file stands in."""
    import mlflow

    from pipeline.report import generate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    _params(tmp_path / "params.yaml")
    _log_group(tmp_path, "only", {"evaluate@ve": {"json": {**_quality(33.0, 2.0), "nfe": 10, "seconds": 1.0},
                                                  "artifact": False},
                                  "classifier": {"json": {"accuracy": 0.9}, "artifact": False}}, "partial")
    (tmp_path / "reports" / "metrics").mkdir(parents=True)
    (tmp_path / "reports" / "metrics" / "classifier.json").write_text(json.dumps({"accuracy": 0.91, "extractor": EXT}))
    md, _ = generate("partial", None, tmp_path / "out", figures_dir=None)
    text = md.read_text()
    t = tables(text)
    assert all(c == NOT_RUN for c in row(t["Per-model sample quality (evaluate@{kind})/model"], "ve")[1:])
    assert "Runs without a metrics/ JSON artifact (their numbers show as not run): evaluate@ve." in text
    assert f"| classifier test accuracy ({EXT}, ?) | 0.91 |" in text        # the JSON file, not the 0.9 metric
    assert "local reports/metrics files" in text and "classifier" in text
    assert all(r[3] == NOT_RUN for r in t["The article's claims, as measured/figure"][1:])
    fig1 = t["Figure 1: toy mixture, Langevin with and without annealing (toy)/sampler"]
    assert all(c == NOT_RUN for r in fig1[1:] for c in r[1:])
    assert "The annealing stage has not run" in text and "The samplers stage has not run" in text


def test_report_html_is_self_contained(store):
    from pipeline.report import generate

    tmp, _, _ = store
    _, page = generate(EXPERIMENT, None, tmp / "out", figures_dir=None)
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//)""", html)
    assert "@import" not in html and "url(" not in html
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    # Plots drawn here (FID per model, loss, ablation, samplers cost, across groups) + the two logged figures.
    assert len(images) >= 7
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "samples_ve.png" in html and "toy_exact.png" in html
    assert 'class="ok">holds<' in html


def test_report_cli_selected_runs_and_errors(store, capsys):
    from pipeline.report import main

    tmp, _, _ = store
    assert main(["--experiment", EXPERIMENT, "--runs", "repro-old", "--out", str(tmp / "old")]) == 0
    text = (tmp / "old" / "report.md").read_text()
    assert "| run group | repro-old |" in text and "30.25" not in text and "41.5" in text
    assert main(["--experiment", EXPERIMENT, "--runs", "nope", "--out", str(tmp / "x")]) == 1
    assert "run groups not found" in capsys.readouterr().err
    assert main(["--experiment", "no-such-experiment", "--out", str(tmp / "x")]) == 1
    assert main(["--experiment", EXPERIMENT, "--params", str(tmp / "missing.yaml"), "--out", str(tmp / "x")]) == 2


def test_empty_experiment_reports_not_run(store):
    import mlflow

    from pipeline.report import generate

    tmp, _, _ = store
    mlflow.set_experiment("empty-exp")
    md, page = generate("empty-exp", None, tmp / "empty", figures_dir=None)
    assert NOT_RUN in md.read_text() and page.exists()


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

    tmp, _, _ = store
    _, page = generate(EXPERIMENT, None, tmp / "out", figures_dir=None)
    shot = tmp / "shot.png"
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
