"""Stage `fid_ref`: reference statistics of the real data, computed once, cached as data/fid/ref_stats.npz.

Images: features of the reference split (``evaluate.reference_split``, at most ``evaluate.n_reference``
images, a seeded random subset) with the trained classifier (``<dataset>_cnn``), and with Inception-v3
as well when its weights are configured or reachable (:func:`pipeline.fidelity.resolve_inception`;
offline the download fails and the fallback is said in the log, the npz and the MLflow tags). The npz
holds, per extractor, the feature matrix (KID needs it) and the FID mean / covariance; evaluate@{sde}
hands them to torch-fidelity through its input2 cache and never recomputes them.

As a sanity figure the stage also measures real-vs-real FID / KID (the other split against the
reference): the floor a perfect sampler would reach with that many samples
(reports/metrics/fid_ref.json).

Toy data: the reference points and the true mixture (``prepare.toy``) for sliced Wasserstein and
mode-weight errors.
"""
from __future__ import annotations

from pipeline.params import COMMON, DEVICE, Bool, Int, Optional, OrAuto, Section, Str
from pipeline.stage import Timer, atomic_path, stage_main, write_json
from stages.prepare import SCHEMA as PREPARE_SCHEMA

DATA = "data/prepared/data.parquet"
CLASSIFIER = "models/classifier.pt"
OUT = "data/fid/ref_stats.npz"
OUT_METRICS = "reports/metrics/fid_ref.json"

EVALUATE = Section({
    "device": DEVICE,
    "batch_size": Int(256, ge=1, le=100_000),
    "n": OrAuto(Int(ge=2), default="auto"),
    "reference_split": Str("train", choices=("train", "test", "all")),
    "n_reference": Int(10_000, ge=2, le=10_000_000),
    "kid_subsets": Int(100, ge=1, le=100_000),
    "kid_subset_size": Int(1000, ge=2, le=1_000_000),
    "inception_weights": Optional(Str()),
    "inception_download": Bool(True),
    "sw_projections": Int(128, ge=1, le=100_000),
})

# prepare.toy (the true mixture) is validated by the prepare stage's own schema.
SCHEMA = {**COMMON, "evaluate": EVALUATE, "prepare": PREPARE_SCHEMA["prepare"]}


def _subset(n_total: int, n_max: int, seed: int):
    import torch

    if n_total <= n_max:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_total, generator=g)[:n_max]).values


def run(params: dict, run, args) -> None:
    import numpy as np
    import torch

    from scoresde.training import resolve_device

    from pipeline import fidelity as fd
    from scoresde.data import load_prepared

    e = params["evaluate"]
    split = None if e["reference_split"] == "all" else e["reference_split"]
    ref = load_prepared(DATA, split=split)
    dataset, kind = ref.meta["dataset"], ref.meta["kind"]
    idx = _subset(len(ref), e["n_reference"], params["seed"])
    x_ref = ref.x[idx]
    summary: dict = {"dataset": dataset, "n_reference": int(len(idx)), "reference_split": e["reference_split"]}

    if kind != "image":
        toy = params["prepare"]["toy"]
        with atomic_path(OUT) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, kind=np.array("points"), dataset=np.array(dataset), points=x_ref.numpy().astype(np.float32),
                     mixture_weights=np.array(toy["weights"], dtype=np.float64),
                     mixture_means=np.array(toy["means"], dtype=np.float64), mixture_std=np.array(toy["std"]))
        print(f"[fid_ref] {dataset}: {len(idx)} reference points + the true mixture -> {OUT}", flush=True)
        write_json(OUT_METRICS, summary)
        run.log_metrics({"n_reference": len(idx)})
        run.set_tags({"dataset": dataset, "extractor": "none (points)"})
        return

    device = resolve_device(e["device"])
    cuda = device.type == "cuda"
    refs, messages = [], []
    ckpt = torch.load(CLASSIFIER, map_location="cpu", weights_only=True)
    if ckpt.get("model") is not None:
        model, _ = fd.load_classifier(CLASSIFIER, device)
        refs.append(fd.register_classifier(fd.extractor_name(dataset), model))
    else:
        messages.append(f"no classifier ({ckpt.get('skipped')})")
    ok, weights, message = fd.resolve_inception(e["inception_weights"], e["inception_download"])
    fd.log(message, "fid_ref")
    messages.append(message)
    if ok:
        refs.append(fd.INCEPTION)
    if not refs:
        raise SystemExit("[fid_ref] no feature extractor: no classifier for this dataset and no Inception-v3 weights "
                         "(set evaluate.inception_weights to weights-inception-2015-12-05-6726825d.pth)")

    u8 = fd.to_uint8(x_ref)
    other_split = {"train": "test", "test": "train"}.get(e["reference_split"])
    other = fd.to_uint8(load_prepared(DATA, split=other_split).x) if other_split else None
    references, metrics = [], {}
    with Timer() as timer:
        for name in refs:
            kw = {"cuda": cuda, "batch_size": e["batch_size"], "weights_path": weights if name == fd.INCEPTION else None}
            r = fd.reference_statistics(u8, name, **kw)
            references.append(r)
            print(f"[fid_ref] {name}: features {tuple(r.features.shape)} of {len(u8)} {dataset} "
                  f"{e['reference_split']} images", flush=True)
            if other is not None:
                # Real-vs-real: the floor of FID / KID with this many samples (sanity figure).
                real = fd.compute_fid_kid(other, r, name, len(other), kid_subsets=e["kid_subsets"],
                                          kid_subset_size=e["kid_subset_size"], seed=params["seed"], **kw)
                metrics.update({f"{k.rsplit('_n', 1)[0]}_real_{other_split}_n{len(other)}": v for k, v in real.items()})
    for k, v in metrics.items():
        print(f"[fid_ref] real {other_split} vs {e['reference_split']}: {k} = {v:.4f}", flush=True)
    with atomic_path(OUT) as tmp:
        fd.save_references(tmp, references, kind=np.array("image"), dataset=np.array(dataset),
                           shape=np.array(ref.meta["shape"]), extractor_message=np.array(" | ".join(messages)),
                           inception_weights=np.array(weights or ""))
    summary.update({"extractors": refs, "extractor_message": " | ".join(messages), "seconds": timer.seconds, **metrics})
    write_json(OUT_METRICS, summary)
    run.log_metrics({"n_reference": len(idx), "seconds": timer.seconds, **metrics})
    run.set_tags({"dataset": dataset, "extractor": ",".join(fd.metric_tag(r) for r in refs),
                  "extractor_message": " | ".join(messages)[:5000]})


main = stage_main("fid_ref", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
