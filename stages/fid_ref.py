"""Stage `fid_ref`: reference statistics of the real data, computed once, cached as data/fid/ref_stats.npz.

Images: features of the reference split (`evaluate.reference_split`, at most `evaluate.n_reference`
images, a seeded random subset) with the trained classifier (`<dataset>_cnn`), and with Inception-v3 as
well when its weights are configured or reachable (offline the download fails and the fallback is said in
the log, the npz and the MLflow tags). evaluate@* and the experiment stages read them and never recompute
them. As a sanity figure the stage measures real-vs-real FID / KID (the other split against the
reference): the floor a perfect sampler would reach with that many samples (reports/metrics/fid_ref.json).
Toy data: the reference points and the true mixture (`prepare.toy`) for the point metrics.
"""
from __future__ import annotations

from pipeline.io import Timer, atomic_path, write_json
from pipeline.params import COMMON
from pipeline.schemas import EVALUATE, PREPARE
from pipeline.stage import stage_main

DATA = "data/prepared/data.parquet"
OUT = "data/fid/ref_stats.npz"
OUT_METRICS = "reports/metrics/fid_ref.json"
SCHEMA = {**COMMON, "evaluate": EVALUATE, "prepare": PREPARE}  # prepare.toy: the true mixture


def run(params: dict, run, args) -> None:
    import numpy as np
    import torch

    from pipeline import fidelity as fd
    from pipeline import quality
    from scoresde.data import load_prepared, to_uint8
    from scoresde.distributed import resolve_device

    e, seed = params["evaluate"], params["seed"]
    split = None if e["reference_split"] == "all" else e["reference_split"]
    ref = load_prepared(DATA, split=split)
    dataset, kind = ref.meta["dataset"], ref.meta["kind"]
    idx = torch.arange(len(ref))
    if len(ref) > e["n_reference"]:  # a seeded random subset, in data order
        idx = torch.sort(torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:e["n_reference"]]).values
    summary: dict = {"dataset": dataset, "n_reference": int(len(idx)), "reference_split": e["reference_split"]}
    if kind != "image":
        quality.save_points_reference(OUT, ref.x[idx], dataset, params["prepare"]["toy"])
        print(f"[fid_ref] {dataset}: {len(idx)} reference points + the true mixture -> {OUT}", flush=True)
        write_json(OUT_METRICS, {**summary, "extractors": [quality.POINTS]})
        run.log_metrics({"n_reference": len(idx)})
        run.set_tags({"dataset": dataset, "extractor": quality.POINTS})
        run.log_artifact(OUT_METRICS, "metrics")
        return

    device = resolve_device(e["device"])
    names, weights, messages = quality.available_extractors(dataset, e, device=device)
    if not names:
        raise SystemExit("[fid_ref] no feature extractor: no classifier for this dataset and no Inception-v3 weights "
                         "(set evaluate.inception_weights to weights-inception-2015-12-05-6726825d.pth)")
    other_split = {"train": "test", "test": "train"}.get(e["reference_split"])
    other = to_uint8(load_prepared(DATA, split=other_split).x) if other_split else None
    with Timer() as timer:
        references, floor = quality.image_references(to_uint8(ref.x[idx]), names, weights, e, device, other,
                                                     other_split or "", seed)
    for k, v in floor.items():
        print(f"[fid_ref] real {other_split} vs {e['reference_split']}: {k} = {v:.4f}", flush=True)
    message = " | ".join(messages)
    with atomic_path(OUT) as tmp:
        fd.save_references(tmp, references, kind=np.array("image"), dataset=np.array(dataset),
                           shape=np.array(ref.meta["shape"]), extractor_message=np.array(message),
                           inception_weights=np.array(weights or ""))
    summary.update({"extractors": [fd.metric_tag(n) for n in names], "extractor_message": message,
                    "seconds": timer.seconds, "real_split": other_split, "n_real": len(other) if other_split else 0,
                    **floor})
    write_json(OUT_METRICS, summary)
    run.log_metrics({"n_reference": len(idx), "seconds": timer.seconds, **floor})
    run.set_tags({"dataset": dataset, "extractor": ",".join(summary["extractors"]), "extractor_message": message[:5000]})
    run.log_artifact(OUT_METRICS, "metrics")


main = stage_main("fid_ref", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
