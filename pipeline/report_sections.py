"""The report's sections, built from the structured metrics of the stage runs (see :mod:`pipeline.report_data`).

Every number comes from a field of a stage's metrics JSON; quality metric names are composed from the
``extractors`` and ``n`` fields with :func:`pipeline.quality.quality_keys` (the first extractor is the
headline one), the floor of ``fid_ref`` with :func:`pipeline.quality.real_keys`. Claims are checked by
:mod:`pipeline.claims`. Missing stages show "not run"; values of runs carried over from an earlier
reproduction carry ``*``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from pipeline import claims as claims_mod
from pipeline.quality import FID_BOOTSTRAP, Z95, quality_keys, real_keys, significant
from pipeline.report_data import Group, Run, Snapshot
from pipeline.report_render import CARRIED, NOT_RUN, Figure, Section, Table, fmt, mark, plot_ablation, plot_bars, \
    plot_cost, plot_groups, plot_losses

TOY_SAMPLERS = ("iid", "langevin", "annealed_langevin")
TOY_METRICS = ("mode_weight_error", "sliced_wasserstein")
TOY_SCORES = ("exact", "learned")
ANNEALING_ROWS = ("langevin_fixed_sigma", "annealed_langevin")


def _when(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if epoch else "unknown"


def default_extractors(snap: Snapshot) -> list[str]:
    """fid_ref's ``extractors``: used for a quality dict that does not list its own."""
    _, ref = snap.find("fid_ref")
    return list((ref or {}).get("extractors") or [])


def extractors_of(entry: dict, default: list[str]) -> list[str]:
    found = entry.get("extractors")
    return [str(e) for e in found] if isinstance(found, list) and found else list(default)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def headline(entry: dict | None, default: list[str]) -> tuple[str, str, float] | None:
    """(label, metric name, value) of the headline score of one quality dict: ("FID", "fid_digits_cnn_n500", 41.5)."""
    found = claims_mod.headline_score(entry, default) if entry else None
    if found is None:
        return None
    label = next(iter(quality_keys(extractors_of(entry, default)[0], int(entry["n"]))))
    return ("FID" if label == "fid" else label), found[0], found[1]


def _label(scores: dict) -> str:
    return "/".join(sorted({h[0] for h in scores.values()})) or "FID"


# ----------------------------------------------------------- quality tables
def quality_table(first: str, rows_in: list[tuple[str, Run | None, dict | None]], default: list[str],
                  extra: list[tuple[str, str]], group_column: bool = False) -> Table:
    """One row per (label, extractor): extractor, n, the quality metrics of ``quality_keys``, then ``extra`` fields.

    ``rows_in``: (label, run, quality dict); ``extra``: (column title, JSON field).
    """
    labels: list[str] = []
    for _, _, entry in rows_in:
        if entry and "skipped" not in entry and "n" in entry:
            for ext in extractors_of(entry, default):
                labels += [k for k in quality_keys(ext, int(entry["n"])) if k not in labels]
    labels = labels or ["fid", "kid", "kid_std"]
    cols = [first, "extractor", "n"] + labels + [title for title, _ in extra] + (["run group"] if group_column else [])
    rows = []
    for label, run, entry in rows_in:
        if run is None or entry is None:
            rows.append([label] + [NOT_RUN] * (len(cols) - 1))
            continue
        group = [run.group + (" (earlier)" if run.carried else "")] if group_column else []
        if "skipped" in entry:
            rows.append([label, f"skipped: {entry['skipped']}"] + [""] * (len(cols) - 2 - len(group)) + group)
            continue
        n = entry.get("n")
        exts = extractors_of(entry, default) if n is not None else []
        for ext in exts or ["?"]:
            keys = quality_keys(ext, int(n)) if n is not None and ext != "?" else {}
            cells = [ext, fmt(n)] + [fmt(_num(entry.get(keys[k]))) if k in keys else "" for k in labels]
            cells += [fmt(entry[field]) if field in entry else "" for _, field in extra]  # "": not a field here
            rows.append([label] + [mark(c, run.carried) if c else c for c in cells] + group)
    return Table(cols, rows)


def scored(entry: dict | None, default: list[str]) -> tuple[str, float, float | None] | None:
    """(metric name, value, its bootstrap std or None) of the headline score of one quality dict."""
    h = headline(entry, default) if entry and "skipped" not in entry else None
    if h is None:
        return None
    std_key = quality_keys(extractors_of(entry, default)[0], int(entry["n"])).get("fid_std")
    return h[1], h[2], _num(entry.get(std_key)) if std_key else None


def significance_table(entries: dict[str, dict | None], default: list[str], against: str | None = None) -> Table | None:
    """Pairwise differences of headline scores with their 95 % intervals and a verdict.

    All pairs, or each entry against ``against``. Two scores are compared only when they have the same metric
    name (same extractor and n) and both carry a bootstrap std; the interval is ±1.96 · sqrt(std_a² + std_b²)
    (independent sample sets; normal approximation of the bootstrap distribution of the difference).
    """
    found = {k: sc for k, e in entries.items() if (sc := scored(e, default))}
    labels = list(found)
    pairs = ([(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]] if against is None else
             [(a, against) for a in labels if a != against and against in found])
    rows = []
    for a, b in pairs:
        (na, va, sa), (nb, vb, sb) = found[a], found[b]
        if na != nb or sa is None or sb is None:
            rows.append([f"{a} − {b}", fmt(va - vb), "no error bars" if na == nb else "different metrics", ""])
            continue
        half = Z95 * (sa ** 2 + sb ** 2) ** 0.5
        rows.append([f"{a} − {b}", fmt(va - vb), f"[{fmt(va - vb - half)}, {fmt(va - vb + half)}]",
                     "significant" if significant(va, sa, vb, sb) else "not distinguishable"])
    if not rows:
        return None
    metric = sorted({sc[0] for sc in found.values()})
    return Table(["difference", "Δ", "95 % interval", "verdict"], rows,
                 f"Which differences are real ({', '.join(metric)}; ± from {FID_BOOTSTRAP} bootstrap resamples of "
                 f"the generated samples' features, reference fixed)")


# ---------------------------------------------------------------- sections
def section_overview(experiment: str, snap: Snapshot, group: Group | None) -> Section:
    sec = Section("Reproduction")
    ran = [r for r in snap.runs.values() if not r.carried]
    sec.tables.append(Table(["", ""], [
        ["experiment", experiment],
        ["run group", snap.group],
        ["git commit", group.git_commit if group else "unknown"],
        ["started", _when(group.start if group else 0.0)],
        ["stage runs in this group", f"{len(ran)} finished, {group.n_failed if group else 0} failed"],
        ["stages carried from earlier runs (*)",
         ", ".join(sorted(r.dvc_stage for r in snap.runs.values() if r.carried)) or "none"],
        ["versions", ", ".join(f"{k} {v}" for k, v in sorted((group.versions if group else {}).items())
                               if v != "not-installed")],
    ]))
    sec.text.append(f"Values marked {CARRIED} come from the latest earlier run of that stage: DVC found it up to "
                    f"date and did not re-run it in this reproduction.")
    if snap.without_metrics:
        sec.text.append("Runs without a metrics/ JSON artifact (their numbers show as not run): "
                        + ", ".join(snap.without_metrics) + ".")
    if snap.local:
        sec.text.append("Numbers read from the local reports/metrics files (the runs logged no metrics artifact): "
                        + ", ".join(sorted(snap.local)) + ".")
    return sec


def section_models(snap: Snapshot, kinds: list[str], histories: dict[str, list[tuple[int, float]]]) -> Section:
    sec = Section("Per-model sample quality (evaluate@{kind})")
    default = default_extractors(snap)
    kinds = list(kinds) + sorted({r.sde for r, _ in snap.all("evaluate")} - set(kinds))
    found = {k: snap.find("evaluate", sde=k) for k in kinds}
    sec.tables.append(quality_table("model", [(k, *found[k]) for k in kinds], default,
                                    [("NFE", "nfe"), ("seconds", "seconds"), ("sampler", "sampler"),
                                     ("checkpoint", "checkpoint"), ("dataset", "dataset")], group_column=True))
    if (sig := significance_table({k: d for k, (_, d) in found.items()}, default)) is not None:
        sec.tables.append(sig)
    train = [(k, *snap.find("train", sde=k)) for k in kinds]
    sec.tables.append(Table(["model", "training steps", "final loss", "seconds"], [
        [k] + ([mark(fmt(d.get(f)), r.carried) for f in ("steps", "final_loss", "seconds")] if r and d else
               [NOT_RUN] * 3) for k, r, d in train], "Training (train@{kind})"))
    for msg in sorted({d["extractor_fallback"] for _, d in found.values() if d and d.get("extractor_fallback")}):
        sec.text.append(f"Feature extractor: {msg}.")
    sec.text.append("FID / KID are named after the feature extractor and the sample count n (fid_<extractor>_n<n>); "
                    "scores of different extractors or sample counts are not comparable. The real-vs-real floor "
                    "is below.")
    scores = {k: h for k in kinds if (h := headline(found[k][1], default))}
    if scores:
        names = sorted({h[1] for h in scores.values()})
        sec.figures.append(Figure(f"Headline score per model ({', '.join(names)})",
                                  plot_bars({k: h[2] for k, h in scores.items()}, _label(scores),
                                            f"{_label(scores)} per model (evaluate)")))
    if histories:
        sec.figures.append(Figure("Training loss per model (MLflow metric history)", plot_losses(histories)))
    return sec


def section_reference(snap: Snapshot) -> Section:
    sec = Section("Feature extractor and reference (classifier, fid_ref)")
    (clf, c), (ref, f) = snap.find("classifier"), snap.find("fid_ref")
    rows = []
    if clf is None or c is None:
        rows.append(["classifier test accuracy", NOT_RUN])
    elif "accuracy" in c:
        rows.append([f"classifier test accuracy ({c.get('extractor', '?')}, {c.get('dataset', '?')})",
                     mark(fmt(c["accuracy"]), clf.carried)])
    else:
        rows.append(["classifier", mark(str(c.get("skipped", "no accuracy in classifier.json")), clf.carried)])
    if ref is None or f is None:
        rows.append(["reference statistics", NOT_RUN])
    else:
        rows.append([f"reference images ({f.get('dataset', '?')}, {f.get('reference_split', '?')} split)",
                     mark(fmt(f.get("n_reference")), ref.carried)])
        split, n_real = f.get("real_split"), f.get("n_real")
        for ext in f.get("extractors") or []:
            if not split or not n_real:
                rows.append([f"real vs real ({ext})", "no held-out real split" if "real_split" in f else
                             "not logged (fid_ref.json has no real_split / n_real)"])
                continue
            for label, name in real_keys(ext, str(split), int(n_real)).items():
                rows.append([f"real {split} vs reference: {name}", mark(fmt(_num(f.get(name))), ref.carried)])
        if f.get("extractor_message"):
            sec.text.append(f"Extractor choice: {f['extractor_message']}.")
    sec.tables.append(Table(["quantity", "value"], rows))
    sec.text.append("Real-vs-real FID (held-out real images against the reference) is the floor a perfect sampler "
                    "would reach with that many samples.")
    return sec


def section_toy(snap: Snapshot) -> Section:
    sec = Section("Figure 1: toy mixture, Langevin with and without annealing (toy)")
    r, d = snap.find("toy")
    d = d or {}
    found = {smp for s in TOY_SCORES for m in TOY_METRICS for smp in ((d.get(s) or {}).get(m) or {})}
    samplers = list(TOY_SAMPLERS) + sorted(found - set(TOY_SAMPLERS))
    cols = [f"{m} ({s})" for m in TOY_METRICS for s in TOY_SCORES]
    rows = [[smp] + [mark(fmt(_num(((d.get(s) or {}).get(m) or {}).get(smp))), bool(r and r.carried))
                     for m in TOY_METRICS for s in TOY_SCORES] for smp in samplers]
    sec.tables.append(Table(["sampler"] + cols, rows))
    if r is None:
        sec.text.append("The toy stage has not run in this experiment.")
    sec.text.append("Claims checked against these numbers are in the claims table above.")
    return sec


def section_annealing(snap: Snapshot) -> Section:
    sec = Section("Figures 2/3: fixed-sigma Langevin vs annealed Langevin (annealing)")
    r, d = snap.find("annealing")
    names = list(ANNEALING_ROWS) + sorted(k for k, v in (d or {}).items()
                                          if isinstance(v, dict) and k not in ANNEALING_ROWS)
    sec.tables.append(quality_table("sampler", [(k, r, (d or {}).get(k) if r else None) for k in names],
                                    default_extractors(snap), [("NFE", "nfe"), ("seconds", "seconds"),
                                                               ("sigma", "sigma")]))
    if r is None:
        sec.text.append(f"The annealing stage has not run in this experiment ({NOT_RUN}).")
    elif (sig := significance_table({k: (d or {}).get(k) for k in names}, default_extractors(snap))) is not None:
        sec.tables.append(sig)
    return sec


def section_ablation(snap: Snapshot, sigmas: list[float]) -> Section:
    sec = Section("Figure 4: ablation of the smallest noise level sigma_end (ablation)")
    found = snap.ablation()
    order = sorted(set(sigmas) | set(found), reverse=True)
    rows_in = [(fmt(s), *(found.get(s) or (None, None))) for s in order]
    sec.tables.append(quality_table("sigma_end", rows_in, default_extractors(snap),
                                    [("NFE", "nfe"), ("seconds", "seconds"), ("training steps", "train_steps")]))
    default = default_extractors(snap)
    if (sig := significance_table({fmt(s): d for s, (_, d) in sorted(found.items(), reverse=True)}, default)):
        sec.tables.append(sig)
    scores = {s: h for s, (_, d) in found.items() if (h := headline(d, default))}
    if len(scores) >= 2:
        sec.figures.append(Figure("Headline score against sigma_end",
                                  plot_ablation({s: h[2] for s, h in scores.items()}, _label(scores))))
    return sec


def few_step_verdict(kind: str, entries: dict[str, dict], default: list[str], few: int = 35, many: int = 1000,
                     within: float = 0.10) -> str | None:
    """The best sampler with ≤ ``few`` NFE against the best with ≥ ``many``: within ``within`` of its FID, and
    whether the gap is significant at 95 % (bootstrap std of both)."""
    def best(ok):
        cands = [(sc[1], k, sc[2]) for k, v in entries.items() if (sc := scored(v, default)) and ok(_num(v.get("nfe")) or 0)]
        return min(cands) if cands else None

    fast, slow = best(lambda n: 0 < n <= few), best(lambda n: n >= many)
    if fast is None or slow is None:
        return None
    ratio = fast[0] / slow[0] - 1
    gap = "no error bars" if fast[2] is None or slow[2] is None else (
        "the gap is significant at 95 %" if significant(fast[0], fast[2], slow[0], slow[2]) else
        "the gap is not distinguishable from noise at 95 %")
    return (f"{kind}: best ≤ {few}-NFE sampler {fast[1]} (FID {fmt(fast[0])}) vs best ≥ {many}-NFE sampler {slow[1]} "
            f"(FID {fmt(slow[0])}): {ratio:+.1%} — {'within' if ratio <= within else 'not within'} "
            f"{within:.0%}; {gap}.")


def section_samplers(snap: Snapshot, models: list[str] | None = None) -> Section:
    """One table per model of ``samplers.models`` (stage ``samplers@<kind>``), each sampler against the best one."""
    sec = Section("Samplers: quality against compute (samplers@{model})")
    default = default_extractors(snap)
    found = {r.sde: (r, d) for r, d in snap.all("samplers") if r.sde}
    models = list(models or []) + sorted(set(found) - set(models or []))
    cost: dict[str, tuple[float, float]] = {}
    if not models:
        sec.text.append(f"The samplers stage has not run in this experiment ({NOT_RUN}).")
    for kind in models:
        r, d = snap.find("samplers", sde=kind) if kind in found else (None, None)
        entries = {k: v for k, v in (d or {}).items() if isinstance(v, dict)}
        rows_in = [(k, r, v) for k, v in entries.items()] or [(NOT_RUN, None, None)]
        table = quality_table("sampler", rows_in, default, [("method", "sampler"), ("NFE", "nfe"),
                                                            ("seconds", "seconds"), ("s / 1000 samples", "seconds_per_1000")])
        table.caption = f"Model {kind} ({(d or {}).get('checkpoint', '?')} weights)"
        sec.tables.append(table)
        if r is None:
            sec.text.append(f"The samplers stage has not run for {kind} in this experiment (samplers@{kind}: {NOT_RUN}).")
            continue
        best = min((k for k in entries if scored(entries[k], default)), key=lambda k: scored(entries[k], default)[1],
                   default=None)
        if best is not None and (sig := significance_table(entries, default, against=best)) is not None:
            sig.caption = f"{kind}: each sampler against the best ({best}). " + sig.caption
            sec.tables.append(sig)
        for k, v in entries.items():
            if (h := headline(v, default)) and (_num(v.get("nfe")) or 0) > 0:
                cost[f"{kind}: {k}"] = (float(v["nfe"]), h[2])
        if (line := few_step_verdict(kind, entries, default)):
            sec.text.append(line)
    if cost:
        sec.figures.append(Figure("Headline score against NFE per sampler and model", plot_cost(cost, "FID")))
    return sec


def section_claims(snap: Snapshot) -> Section:
    sec = Section("The article's claims, as measured")
    rows = []
    for row in claims_mod.evaluate(snap.claims_input()):
        c = row.claim
        measured = fmt(row.value) if c.threshold is not None or row.value is None else \
            f"{fmt(row.value)} vs {fmt(row.reference)}"
        rows.append([c.figure, c.text, measured, row.verdict])
    sec.tables.append(Table(["figure", "claim", "measured", "verdict"], rows))
    return sec


# ------------------------------------------------------------- comparison
def headline_values(snap: Snapshot) -> dict[tuple[str, str], tuple[float, bool]]:
    """(dvc stage, quantity) -> (value, carried) for the headline numbers of every stage run."""
    default = default_extractors(snap)
    out: dict[tuple[str, str], tuple[float, bool]] = {}

    def quality(r: Run, entry: Any, prefix: str = "") -> None:
        if not isinstance(entry, dict) or "n" not in entry:
            return
        exts = extractors_of(entry, default)
        if not exts:
            return
        for label, name in quality_keys(exts[0], int(entry["n"])).items():
            if label != "kid_std" and _num(entry.get(name)) is not None:
                out[(r.dvc_stage, prefix + name)] = (float(entry[name]), r.carried)

    for name in sorted(snap.data):
        r, d = snap.runs[name], snap.data[name]
        if r.stage in ("evaluate", "ablation"):
            quality(r, d)
        elif r.stage in ("annealing", "samplers"):
            for k, v in d.items():
                quality(r, v, f"{k}: ")
        elif r.stage == "toy":
            for s in TOY_SCORES:
                for m in TOY_METRICS:
                    for smp, v in ((d.get(s) or {}).get(m) or {}).items():
                        if _num(v) is not None:
                            out[(name, f"{s} {m} {smp}")] = (float(v), r.carried)
        elif r.stage == "classifier" and _num(d.get("accuracy")) is not None:
            out[(name, "accuracy")] = (float(d["accuracy"]), r.carried)
        elif r.stage == "fid_ref" and d.get("real_split") is not None and d.get("n_real") is not None:
            for ext in d.get("extractors") or []:
                key = real_keys(ext, str(d["real_split"]), int(d["n_real"]))["fid"]
                if _num(d.get(key)) is not None:
                    out[(name, key)] = (float(d[key]), r.carried)
    return out


def section_comparison(snaps: list[Snapshot], groups: dict[str, Group], kinds: list[str]) -> Section:
    sec = Section("Comparison with earlier reproductions")
    chosen = [s.group for s in snaps]
    values = [headline_values(s) for s in snaps]
    keys = sorted({k for v in values for k in v})
    cols = ["stage", "quantity"] + chosen + ([f"change vs {chosen[1]}"] if len(chosen) > 1 else [])
    rows = []
    for key in keys:
        cells = [mark(fmt(v[key][0]), v[key][1]) if key in v else NOT_RUN for v in values]
        row = list(key) + cells
        if len(chosen) > 1:
            a, b = values[0].get(key), values[1].get(key)
            row.append(fmt(a[0] - b[0]) if a and b else "")
        rows.append(row)
    if not rows:
        rows.append([NOT_RUN, ""] + [NOT_RUN] * (len(cols) - 2))
    info = [[c, groups[c].git_commit[:12], _when(groups[c].start), str(groups[c].n_finished), str(groups[c].n_failed)]
            for c in chosen if c in groups]
    sec.tables.append(Table(["run group", "git commit", "started", "finished runs", "failed runs"], info,
                            "Reproductions compared (the first is this report's)"))
    sec.tables.append(Table(cols, rows, "Headline numbers (FID / KID / toy errors / classifier accuracy)"))
    series: dict[str, dict[str, float]] = {}
    labels = set()
    for s in snaps:
        default = default_extractors(s)
        for k in kinds:
            h = headline(s.find("evaluate", sde=k)[1], default)
            if h:
                series.setdefault(k, {})[s.group] = h[2]
                labels.add(h[0])
    if len(chosen) > 1 and series:
        order = sorted(chosen, key=lambda c: groups[c].start if c in groups else 0.0)
        sec.figures.append(Figure("Headline score per model across reproductions",
                                  plot_groups(series, order, "/".join(sorted(labels)))))
    if len(chosen) == 1:
        sec.text.append("No earlier reproduction in this experiment.")
    return sec


# ------------------------------------------------------------------ tuning
def _dotted(params: dict, key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def section_tuning(sweeps_dir: str | Path | None, params: dict, report_dir: str | Path = "reports") -> Section:
    """Hyperparameter sweeps (``reports/sweeps/<NAME>.json`` of :mod:`pipeline.sweep`): best trial vs defaults."""
    sec = Section("Tuning (hyperparameter sweeps)")
    files = sorted(Path(sweeps_dir).glob("*.json")) if sweeps_dir and Path(sweeps_dir).is_dir() else []
    if not files:
        sec.text.append(f"No sweep results in {sweeps_dir} ({NOT_RUN}): `python -m pipeline.sweep sweeps/NAME.yaml` "
                        "runs one (see README, \"Sweeps\").")
        return sec
    sec.text.append("Each sweep varies params.yaml keys with Optuna and reproduces the objective's stage per trial in "
                    "its own workspace (upstream stages reused). \"default\" is the value in params.yaml and the base "
                    "run's objective (params.yaml + the sweep's base_params); \"best\" is the best COMPLETE trial.")
    for path in files:
        try:
            data = json.loads(path.read_text())
            objective, keys = data["objective"], list(data["params"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            sec.text.append(f"{path.name}: unreadable ({err}).")
            continue
        best, base = data.get("best"), (data.get("baseline") or {}).get("objective")
        head = f"best (trial {best['number']})" if best else "best"
        rows = []
        for key in keys:
            default = _dotted(params, key)
            default = (data.get("defaults") or {}).get(key) if default is None else default
            rows.append([key + (" (log range)" if key in data.get("log_params", []) else ""), fmt(default),
                         fmt(best["params"].get(key)) if best else NOT_RUN])
        rows.append([f"{objective['stage']}: {objective['key']} ({objective['direction']})",
                     fmt(_num(base)), fmt(_num(best["objective"])) if best else NOT_RUN])
        trials = data.get("trials") or []
        rows.append(["trials complete / run / requested", "",
                     f"{data.get('complete', 0)} / {len(trials)} / {data.get('trials_requested', '?')}"])
        sec.tables.append(Table(["sweep " + str(data.get("sweep", path.stem)), "default", head], rows,
                                f"{data.get('sweep', path.stem)}: {data.get('method', '?')} search"
                                + (f" ({data['description']})" if data.get("description") else "")))
        png = path.with_suffix(".png")
        if png.is_file():
            sec.figures.append(Figure(f"Sweep {data.get('sweep', path.stem)}: {objective['key']} against each varied "
                                      "parameter (star: best trial; dashed: defaults)", png.read_bytes(),
                                      os.path.relpath(png, report_dir)))
    return sec
