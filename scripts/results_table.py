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

from pipeline.quality import headline, quality_keys, real_keys  # noqa: E402
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

    rows = ["| model | sampler | NFE | sampling s | FID | KID | train steps | train s |", "|---|---|---|---|---|---|---|---|"]
    fid_name = None
    for kind in MODEL_KINDS:
        e, t = _load(d, f"evaluate_{kind}"), _load(d, f"train_{kind}")
        fid_name, fid = _fid(e)
        kid = e[quality_keys(e["extractors"][0], e["n"])["kid"]]
        rows.append(f"| {kind} | {e['sampler']} | {e['nfe']} | {e['seconds']:.1f} | {fid:.2f} | {kid:.3f} "
                    f"| {t['steps']} | {t['seconds']:.0f} |")
    out.append(f"**Per SDE** (`{fid_name}`; EMA weights):\n\n" + "\n".join(rows) + "\n")

    toy = _load(d, "toy")
    rows = ["| scores | i.i.d. | Langevin | annealed Langevin |", "|---|---|---|---|"]
    for src in ("exact", "learned"):
        w = toy[src]["mode_weight_error"]
        rows.append(f"| {src} | {w['iid']:.4f} | {w['langevin']:.4f} | {w['annealed_langevin']:.4f} |")
    out.append("**Figure 1** (toy mixture 0.8/0.2): error of the recovered mode weights\n\n" + "\n".join(rows) + "\n")

    a = _load(d, "annealing")
    fa, fl = _fid(a["annealed_langevin"]), _fid(a["langevin_fixed_sigma"])
    out.append(f"**Figures 2/3** (NCSN): `{fa[0]}` annealed Langevin {fa[1]:.2f} vs Langevin at fixed "
               f"σ = {a['langevin_fixed_sigma'].get('sigma', 'σ_L'):g} {fl[1]:.2f} "
               f"({a['annealed_langevin']['nfe']} vs {a['langevin_fixed_sigma']['nfe']} NFE).\n")

    rows = ["| σ_end | FID | train steps |", "|---|---|---|"]
    for path in sorted(d.glob("ablation_*.json"), key=lambda p: -float(p.stem.split("_", 1)[1])):
        m = json.loads(path.read_text())
        name, fid = _fid(m)
        rows.append(f"| {m['sigma_end']:g} | {fid:.2f} | {m['train_steps']} |")
    out.append(f"**Figure 4** (σ_end ablation, L = 10 levels from σ_begin; `{name}`):\n\n" + "\n".join(rows) + "\n")

    s = _load(d, "samplers")
    per = s.get("samplers", s)
    rows = ["| sampler | NFE | s per 1000 images | FID |", "|---|---|---|---|"]
    order = ["pc", "reverse_diffusion", "ode", "heun", "annealed_langevin"]
    for method, m in sorted(per.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        if not isinstance(m, dict) or "skipped" in m:
            continue
        name, fid = _fid(m)
        per_k = m["seconds_per_1000"] if "seconds_per_1000" in m else 1000 * m["seconds"] / m["n"]
        rows.append(f"| {method} | {m['nfe']} | {per_k:.0f} | {fid:.2f} |")
    out.append(f"**Samplers** on `{s.get('sde', 've')}` (`{name}`):\n\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metrics", type=Path, default=Path("reports/metrics"))
    args = ap.parse_args(argv)
    print(tables(args.metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
