"""Figure 4's ablation of the smallest noise level σ_end: its params section and the files of its stages.

``ablation@<σ_end>`` (one per value of ``ablation.sigma_ends``, a dvc.yaml foreach) trains a short NCSN on
L = ``num_levels`` geometric levels from σ_begin down to σ_end and scores its annealed-Langevin samples;
``ablation_summary`` gathers the per-value metrics into FID against σ_end.
"""
from __future__ import annotations

from pipeline.io import read_json
from pipeline.params import Float, Int, List, Section
from pipeline.quality import headline, headline_std, quality_keys
from pipeline.schemas import DEVICE, sample_section, train_section

PLOT = "reports/plots/ablation.csv"
SUMMARY_FIGURE = "reports/figures/ablation_fid.png"


def _sampler_is_annealed(d: dict):
    if d["sample"]["sampler"] not in ("annealed_langevin", "langevin"):
        return "sample.sampler", "the NCSN of the ablation is sampled with annealed_langevin (or langevin)"
    return None


ABLATION = Section({
    "sigma_ends": List(Float(gt=0), min_len=1),
    "num_levels": Int(10, ge=2, le=100_000),
    "device": DEVICE,
    "train": train_section("ncsn"),
    "sample": sample_section("ncsn"),
    "n_show": Int(64, ge=1, le=1024),
}, checks=[_sampler_is_annealed])


def value_name(value: float) -> str:
    """How a σ_end appears in stage and file names (``0.01`` -> ``0.01``), as DVC renders ``${item}``."""
    return str(value)


def metrics_path(value: str) -> str:
    return f"reports/metrics/ablation_{value}.json"


def figure_path(value: str) -> str:
    return f"reports/figures/ablation_sigma_end_{value}.png"


SUMMARY_COLUMNS = ["sigma_end", "fid", "fid_std", "kid", "metric", "nfe", "seconds"]


def summary_rows(sigma_ends: list[float]) -> list[dict]:
    """One row per σ_end from its metrics file: sigma_end, fid (the headline score), its bootstrap std, kid,
    metric name, nfe, seconds."""
    rows = []
    for v in sigma_ends:
        m = read_json(metrics_path(value_name(v)))
        key, value = headline(m) or ("", None)
        kid = quality_keys(m["extractors"][0], m["n"]).get("kid") if m.get("extractors") else None
        rows.append({"sigma_end": float(v), "fid": value, "fid_std": headline_std(m),
                     "kid": m.get(kid) if kid else None, "metric": key,
                     "nfe": m.get("nfe"), "seconds": m.get("seconds")})
    return rows
