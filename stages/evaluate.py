"""Stage `evaluate@{ncsn,ve,vp,subvp}`: FID / KID of one model's samples against the cached reference.

Reads data/samples/<sde>.npz (``x``: uint8 images ``(N, C, H, W)``, or float32 points for the toy)
and reports/metrics/sample_<sde>.json (``nfe``, ``seconds``, ``sampler``, ``checkpoint``), and the
reference of the ``fid_ref`` stage (data/fid/ref_stats.npz, never recomputed here). For every
extractor in the reference (the classifier ``<dataset>_cnn``; Inception-v3 too when ``fid_ref``
could load it) it runs ``torch_fidelity.calculate_metrics`` on the first ``evaluate.n`` samples:

    fid_<extractor>_n<N>, kid_<extractor>_n<N>, kid_std_<extractor>_n<N>

Beside every FID it writes and logs the sampler, its NFE and seconds, and the checkpoint (EMA or
raw weights) the samples came from: reports/metrics/evaluate_<sde>.json, MLflow metrics + tags.

Toy data (2-D points): ``sliced_wasserstein_n<N>`` (vs the reference points) and
``mode_weight_error_n<N>`` (max |fraction of samples nearest each mode - true weight|) instead of FID.
"""
from __future__ import annotations

from pipeline.params import COMMON
from pipeline.stage import Timer, read_json, stage_main, write_json
from stages.fid_ref import CLASSIFIER, EVALUATE
from stages.fid_ref import OUT as REF

KINDS = ("ncsn", "ve", "vp", "subvp")
SCHEMA = {**COMMON, "evaluate": EVALUATE}


def sample_info(kind: str) -> dict:
    """nfe / seconds / sampler / checkpoint of the samples (checkpoint: 'ema', 'raw' or 'unknown')."""
    info = read_json(f"reports/metrics/sample_{kind}.json")
    checkpoint = info.get("checkpoint")
    if checkpoint is None and "use_ema" in info:
        checkpoint = "ema" if info["use_ema"] else "raw"
    return {"nfe": info.get("nfe"), "seconds": info.get("seconds"), "sampler": info.get("sampler", "unknown"),
            "checkpoint": checkpoint or "unknown"}


def evaluate_points(x, ref: dict, n: int, projections: int, seed: int) -> dict[str, float]:
    import torch

    from scoresde.metrics import mode_weight_error, sliced_wasserstein
    from scoresde.toy import GaussianMixture

    x = torch.as_tensor(x, dtype=torch.float32)[:n]
    mixture = GaussianMixture(torch.as_tensor(ref["mixture_weights"]), torch.as_tensor(ref["mixture_means"]),
                              float(ref["mixture_std"]))
    g = torch.Generator().manual_seed(seed)
    return {f"sliced_wasserstein_n{n}": sliced_wasserstein(x, torch.as_tensor(ref["points"]), projections, generator=g),
            f"mode_weight_error_n{n}": mode_weight_error(x, mixture)}


def run(params: dict, run, args) -> None:
    import numpy as np

    from pipeline import fidelity as fd
    from scoresde.training import resolve_device

    kind, e = args.sde, params["evaluate"]
    with np.load(f"data/samples/{kind}.npz", allow_pickle=False) as z:
        x = z["x"]
    info = sample_info(kind)
    n = len(x) if e["n"] == "auto" else e["n"]
    if n > len(x):
        raise SystemExit(f"[evaluate@{kind}] evaluate.n = {n} but data/samples/{kind}.npz holds {len(x)} samples")
    refs, extra = fd.load_references(REF)
    dataset = str(extra["dataset"])
    metrics: dict[str, float] = {}
    with Timer() as timer:
        if str(extra["kind"]) == "points":
            metrics.update(evaluate_points(x, extra, n, e["sw_projections"], params["seed"]))
            extractors = ["none (points)"]
        else:
            shape = [int(s) for s in extra["shape"]]
            if x.dtype != np.uint8 or list(x.shape[1:]) != shape:
                raise SystemExit(f"[evaluate@{kind}] samples are {x.dtype} {list(x.shape[1:])}, the reference "
                                 f"({dataset}) is uint8 {shape}: re-run the sample stage for this dataset")
            fd.log(f"extractors {list(refs)} (fid_ref: {extra['extractor_message']})", f"evaluate@{kind}")
            device = resolve_device(e["device"])
            extractors = []
            for name, ref in refs.items():
                weights = fd.prepare_extractor(name, extra, CLASSIFIER, device)
                got = fd.compute_fid_kid(x, ref, name, n, cuda=device.type == "cuda", batch_size=e["batch_size"],
                                         kid_subsets=e["kid_subsets"], kid_subset_size=e["kid_subset_size"],
                                         seed=params["seed"], weights_path=weights)
                metrics.update(got)
                extractors.append(fd.metric_tag(name))
    for k, v in metrics.items():
        print(f"[evaluate@{kind}] {k} = {v:.5g}  ({info['sampler']}, {info['nfe']} NFE, {info['checkpoint']} weights)",
              flush=True)
    fallback = "" if "inception" in extractors or str(extra["kind"]) == "points" else str(extra.get("extractor_message", ""))
    out = {**metrics, "nfe": info["nfe"], "seconds": info["seconds"], "sampler": info["sampler"],
           "checkpoint": info["checkpoint"], "extractor": ",".join(extractors), "n": int(n),
           "eval_seconds": timer.seconds, "dataset": dataset}
    if fallback:
        out["extractor_fallback"] = fallback
    write_json(f"reports/metrics/evaluate_{kind}.json", out)
    run.log_metrics({**metrics, "nfe": info["nfe"], "seconds": info["seconds"], "eval_seconds": timer.seconds,
                     "n": n})
    run.set_tags({"extractor": ",".join(extractors), "checkpoint": info["checkpoint"], "sampler": info["sampler"],
                  "dataset": dataset, **({"extractor_fallback": fallback[:5000]} if fallback else {})})


main = stage_main("evaluate", SCHEMA, run, sde_choices=KINDS)

if __name__ == "__main__":
    raise SystemExit(main())
