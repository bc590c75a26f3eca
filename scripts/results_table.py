"""Print the README's results tables (Markdown) from the metrics files of a finished `dvc repro`.

    python scripts/results_table.py [--metrics reports/metrics]

Every figure comes from reports/metrics/*.json as the pipeline wrote it; metric names keep their
extractor and sample count (e.g. fid_digits_cnn_n256), so the table says how each FID was made. The names
are composed from each file's ``extractors`` and ``n`` fields (pipeline.quality), never parsed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.quality import headline, headline_std, quality_keys, real_keys, significant  # noqa: E402
from pipeline.report_sections import few_step_verdict  # noqa: E402
from pipeline.schemas import MODEL_KINDS  # noqa: E402


def _load(d: Path, name: str) -> dict:
    path = d / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing; run `dvc repro` first")
    return json.loads(path.read_text())


def _fid(m: dict) -> tuple[str, float]:
    """The (name, value) of the headline FID of a metrics dict (the first extractor's)."""
    found = headline(m)
    if found is None:
        raise KeyError(f"no headline score in {sorted(m)}")
    return found


def _pm(m: dict) -> str:
    """``12.34 ± 0.56`` (the headline FID and its bootstrap std)."""
    std = headline_std(m)
    return f"{_fid(m)[1]:.2f}" + ("" if std is None else f" ± {std:.2f}")


def _verdicts(scores: dict[str, dict]) -> str:
    """Each pair of scores: significant at 95 % or not distinguishable (pipeline.quality.significant)."""
    names, out = list(scores), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ma, mb = scores[a], scores[b]
            sa, sb = headline_std(ma), headline_std(mb)
            if sa is None or sb is None or _fid(ma)[0] != _fid(mb)[0]:
                continue
            verdict = "differ" if significant(_fid(ma)[1], sa, _fid(mb)[1], sb) else "not distinguishable"
            out.append(f"{a} vs {b}: {verdict}")
    return "; ".join(out)


def tables(d: Path) -> str:
    out = []
    clf = _load(d, "classifier")
    ref = _load(d, "fid_ref")
    key = real_keys(ref["extractors"][0], ref["real_split"], ref["n_real"])["fid"] if ref.get("real_split") else None
    floor = (key, ref[key]) if key in ref else None
    out.append(f"Feature extractor of FID/KID: `{clf['extractor']}` (a CNN trained by the `classifier` stage; held-out "
               f"accuracy {clf['accuracy']:.3f} on {clf['n_test']} images)."
               + (f" The floor: real held-out images against the reference give `{floor[0]}` = {floor[1]:.2f}." if floor
                  else "") + "\n")

    rows = ["| model | sampler | NFE | sampling s | FID ± std | KID | train steps | train s |", "|---|---|---|---|---|---|---|---|"]
    fid_name, evals = None, {}
    for kind in MODEL_KINDS:
        e, t = _load(d, f"evaluate_{kind}"), _load(d, f"train_{kind}")
        fid_name, _ = _fid(e)
        evals[kind] = e
        kid = e[quality_keys(e["extractors"][0], e["n"])["kid"]]
        rows.append(f"| {kind} | {e['sampler']} | {e['nfe']} | {e['seconds']:.1f} | {_pm(e)} | {kid:.3f} "
                    f"| {t['steps']} | {t['seconds']:.0f} |")
    out.append(f"**Per model** (`{fid_name}`; EMA weights; ± = bootstrap std over the generated samples):\n\n"
               + "\n".join(rows) + "\n\nAt 95 %: " + _verdicts(evals) + ".\n")

    toy = _load(d, "toy")
    rows = ["| scores | i.i.d. | Langevin | annealed Langevin |", "|---|---|---|---|"]
    for src in ("exact", "learned"):
        w = toy[src]["mode_weight_error"]
        rows.append(f"| {src} | {w['iid']:.4f} | {w['langevin']:.4f} | {w['annealed_langevin']:.4f} |")
    out.append("**Figure 1** (toy mixture 0.8/0.2): error of the recovered mode weights\n\n" + "\n".join(rows) + "\n")

    a = _load(d, "annealing")
    fa = _fid(a["annealed_langevin"])
    out.append(f"**Figures 2/3** (NCSN): `{fa[0]}` annealed Langevin {_pm(a['annealed_langevin'])} vs Langevin at "
               f"fixed σ = {a['langevin_fixed_sigma'].get('sigma', 'σ_L'):g} {_pm(a['langevin_fixed_sigma'])} "
               f"({a['annealed_langevin']['nfe']} vs {a['langevin_fixed_sigma']['nfe']} NFE).\n")

    rows = ["| σ_end | FID ± std | train steps |", "|---|---|---|"]
    for path in sorted(d.glob("ablation_*.json"), key=lambda p: -float(p.stem.split("_", 1)[1])):
        m = json.loads(path.read_text())
        name, _ = _fid(m)
        rows.append(f"| {m['sigma_end']:g} | {_pm(m)} | {m['train_steps']} |")
    out.append(f"**Figure 4** (σ_end ablation, L = 10 levels from σ_begin; `{name}`):\n\n" + "\n".join(rows) + "\n")

    for path in sorted(d.glob("samplers_*.json")):
        s = json.loads(path.read_text())
        rows = ["| sampler | NFE | s per 1000 images | FID ± std |", "|---|---|---|---|"]
        per = {k: m for k, m in s.items() if isinstance(m, dict) and "skipped" not in m}
        for method, m in per.items():
            name, _ = _fid(m)
            per_k = m["seconds_per_1000"] if "seconds_per_1000" in m else 1000 * m["seconds"] / m["n"]
            rows.append(f"| {method} | {m['nfe']} | {per_k:.0f} | {_pm(m)} |")
        kind = s.get("sde", path.stem.split("_", 1)[1])
        verdict = few_step_verdict(kind, per, [])
        out.append(f"**Samplers** on `{kind}` (`{name}`; ± = bootstrap std):\n\n" + "\n".join(rows) + "\n"
                   + (f"\n{verdict}\n" if verdict else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", type=Path, default=Path("reports/metrics"))
    args = ap.parse_args(argv)
    print(tables(args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
