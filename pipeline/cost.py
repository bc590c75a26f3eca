"""The samplers comparison (sample quality against compute): its params section, configs and table.

``samplers.run`` lists the samplers to run on each model of ``samplers.models`` (one ``samplers@<kind>`` stage
per model); each entry of ``METHODS`` is a named sampler with the keys of a ``sample.<kind>`` section it may
set (``samplers.<name>``).
"""
from __future__ import annotations

from pipeline.params import Bool, Int, List, Section, Str
from pipeline.quality import headline, headline_std, quality_keys
from pipeline.schemas import DEVICE, LANGEVIN_KINDS, MODEL_KINDS, sample_defaults, sample_section

_F = sample_section("ve").fields  # the sample stage's field specs (types, bounds, defaults)
_PC_KEYS = ("steps", "predictor", "corrector", "snr", "n_corrector_steps", "denoise")
METHODS = {  # name -> (sampler, the sample.<kind> keys it may set)
    "pc": ("pc", _PC_KEYS),
    "reverse_diffusion": ("pc", _PC_KEYS),
    "ode": ("ode", ("rtol", "atol")),
    "heun": ("heun", ("num_steps", "rho", "S_churn", "S_tmin", "S_tmax", "S_noise")),
    "dpm_solver_10": ("dpm_solver", ("steps",)),
    "dpm_solver_20": ("dpm_solver", ("steps",)),
    "annealed_langevin": ("annealed_langevin", ("n_steps_each", "step_lr", "denoise")),
}


def _run_known(d: dict):
    for i, name in enumerate(d["run"]):
        if name not in METHODS:
            return f"run[{i}]", f"unknown sampler {name!r}; choose from {list(METHODS)}"
    if len(set(d["run"])) != len(d["run"]):
        return "run", "expected each sampler at most once"
    if len(set(d["models"])) != len(d["models"]):
        return "models", "expected each model at most once"
    return None


SAMPLERS_SECTION = Section({
    "models": List(Str(choices=MODEL_KINDS), min_len=1),  # dvc.yaml: one samplers@<kind> stage each
    "device": DEVICE,
    "use_ema": Bool(True),
    "n": Int(ge=2, le=10_000_000),
    "batch_size": Int(ge=1, le=1_000_000),
    "run": List(Str(), min_len=1),
    "n_show": Int(36, ge=1, le=1024),
    **{name: Section({k: _F[k] for k in keys}) for name, (_, keys) in METHODS.items()},
}, checks=[_run_known])


def method_configs(p: dict, kind: str) -> tuple[dict[str, dict], dict[str, str]]:
    """sample.<kind>-shaped configs of the samplers in ``p["run"]`` (defaults of the sample section, then
    ``samplers.<name>``) for the model ``kind``, and {name: reason} for those the model cannot run."""
    configs, skipped = {}, {}
    for name in p["run"]:
        sampler, _ = METHODS[name]
        if sampler in ("annealed_langevin", "langevin") and kind not in LANGEVIN_KINDS:
            skipped[name] = f"{sampler} needs a σ-conditioned (VE-type) model, not {kind}"
            continue
        configs[name] = {**sample_defaults(), **p[name], "sampler": sampler, "n": p["n"],
                         "batch_size": p["batch_size"], "use_ema": p["use_ema"]}
    return configs, skipped


COLUMNS = ["model", "sampler", "fid", "fid_std", "kid", "nfe", "seconds", "seconds_per_1000", "metric"]


def table_rows(results: dict, kind: str) -> list[dict]:
    rows = []
    for name, r in results.items():
        if "skipped" in r:
            rows.append({"model": kind, "sampler": name, "fid": None, "fid_std": None, "kid": None, "nfe": None,
                         "seconds": None, "seconds_per_1000": None, "metric": r["skipped"]})
            continue
        key, value = headline(r) or ("", None)
        kid = quality_keys(r["extractors"][0], r["n"]).get("kid")
        rows.append({"model": kind, "sampler": name, "fid": value, "fid_std": headline_std(r),
                     "kid": r.get(kid) if kid else None, "nfe": r["nfe"], "seconds": r["seconds"],
                     "seconds_per_1000": r["seconds_per_1000"], "metric": key})
    return rows


def markdown_table(rows: list[dict], sde: str, n: int) -> str:
    metric = next((r["metric"] for r in rows if r["fid"] is not None), "FID")
    lines = [f"# Samplers on the {sde.upper()} model ({n} samples each)", "",
             f"| sampler | {metric} ± std | KID | NFE | seconds | s / 1000 samples |", "|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        if r["fid"] is None and r["nfe"] is None:
            lines.append(f"| {r['sampler']} | skipped: {r['metric']} | | | | |")
        else:
            std = "" if r.get("fid_std") is None else f" ± {r['fid_std']:.2g}"
            lines.append(f"| {r['sampler']} | {fmt(r['fid'], '.4g')}{std} | {fmt(r['kid'], '.4g')} | {r['nfe']} | "
                         f"{fmt(r['seconds'], '.1f')} | {fmt(r['seconds_per_1000'], '.0f')} |")
    lines += ["", "NFE = score-network evaluations per sample; seconds = wall-clock sampling time of all samples "
                  "(batched), also per 1000 samples; ± = std of the FID over bootstrap resamples of the samples."]
    return "\n".join(lines) + "\n"
