"""Stage `evaluate@{ncsn,ve,vp,subvp}`: FID / KID of one model's samples against the cached reference.

Reads data/samples/<kind>.npz (uint8 images `(N, C, H, W)`, or float32 points for the toy),
reports/metrics/sample_<kind>.json and the reference of the `fid_ref` stage (never recomputed here). For
every extractor of the reference (the classifier `<dataset>_cnn`; Inception-v3 too when `fid_ref` could
load it), on the first `evaluate.n` samples (pipeline.quality.sample_quality):

    fid_<extractor>_n<N>, kid_<extractor>_n<N>, kid_std_<extractor>_n<N>

(toy data: `sliced_wasserstein_n<N>`, `mode_weight_error_n<N>`), written beside the sampler, its NFE and
seconds and the checkpoint (EMA or raw weights) the samples came from: reports/metrics/evaluate_<kind>.json.
"""
from __future__ import annotations

from pipeline.io import Timer, read_json, write_json
from pipeline.params import COMMON, ParamsError
from pipeline.schemas import EVALUATE, MODEL_KINDS
from pipeline.stage import stage_main

SCHEMA = {**COMMON, "evaluate": EVALUATE}


def run(params: dict, run, args) -> None:
    import numpy as np

    from pipeline import fidelity as fd
    from pipeline.quality import sample_quality
    from scoresde.distributed import resolve_device

    kind, e = args.sde, params["evaluate"]
    with np.load(f"data/samples/{kind}.npz", allow_pickle=False) as z:
        x = z["x"]
    info = read_json(f"reports/metrics/sample_{kind}.json")
    n = len(x) if e["n"] == "auto" else e["n"]
    if n > len(x):
        raise ParamsError("evaluate.n", f"{n} samples asked, data/samples/{kind}.npz holds {len(x)}")
    ref_info = {}

    def said(names, extra):  # which extractors, and why (Inception or the classifier fallback)
        ref_info.update(extra)
        if "extractor_message" in extra:
            fd.log(f"extractors {names} (fid_ref: {extra['extractor_message']})", f"evaluate@{kind}")

    try:
        with Timer() as timer:
            metrics = sample_quality(x, params["seed"], resolve_device(e["device"]), n, batch_size=e["batch_size"],
                                     kid_subsets=e["kid_subsets"], kid_subset_size=e["kid_subset_size"],
                                     sw_projections=e["sw_projections"], on_extractors=said)
    except ValueError as err:  # samples and reference of different datasets: say so, no traceback
        raise SystemExit(f"[evaluate@{kind}] {err}") from None
    scores = {k: v for k, v in metrics.items() if k not in ("extractors", "n")}
    for k, v in scores.items():
        print(f"[evaluate@{kind}] {k} = {v:.5g}  ({info['sampler']}, {info['nfe']} NFE, {info['checkpoint']} weights)",
              flush=True)
    out = {**metrics, "nfe": info["nfe"], "seconds": info["seconds"], "sampler": info["sampler"],
           "checkpoint": info["checkpoint"], "extractor": ",".join(metrics["extractors"]), "eval_seconds": timer.seconds}
    if "extractor_message" in ref_info and "inception" not in metrics["extractors"]:
        out["extractor_fallback"] = str(ref_info["extractor_message"])
    out["dataset"] = str(ref_info["dataset"])
    write_json(f"reports/metrics/evaluate_{kind}.json", out)
    run.log_metrics({**scores, "nfe": info["nfe"], "seconds": info["seconds"], "eval_seconds": timer.seconds, "n": n})
    run.set_tags({"extractor": out["extractor"], "checkpoint": info["checkpoint"], "sampler": info["sampler"],
                  "dataset": out["dataset"], **({"extractor_fallback": out["extractor_fallback"][:5000]} if "extractor_fallback" in out else {})})
    run.log_artifact(f"reports/metrics/evaluate_{kind}.json", "metrics")


main = stage_main("evaluate", SCHEMA, run, sde_choices=MODEL_KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
