"""Stage `prepare`: dataset -> data/prepared/data.parquet (uint8 images or 2-D points, labels, split).

Decoding happens once here; later stages read Parquet columns (scoresde.data.load_prepared).
"""
from __future__ import annotations

from pipeline.params import COMMON, Bool, Float, Int, List, Section, Str, sums_to_one
from pipeline.stage import stage_main

OUT = "data/prepared/data.parquet"
DATASETS = ("toy", "digits", "mnist", "cifar10", "celeba")


def _toy_checks(d: dict):
    if len(d["means"]) != len(d["weights"]):
        return "means", f"expected one mean per weight ({len(d['weights'])}), got {len(d['means'])}"
    dims = {len(m) for m in d["means"]}
    if len(dims) != 1:
        return "means", "expected all means to have the same dimension"
    return None


SCHEMA = {
    **COMMON,
    "prepare": Section({
        "dataset": Str(choices=DATASETS),
        "root": Str("data/raw"),
        "download": Bool(False),
        "toy": Section({
            "weights": List(Float(gt=0, le=1), min_len=1),
            "means": List(List(Float(), min_len=1), min_len=1),
            "std": Float(gt=0),
            "n": Int(ge=10, le=10_000_000),
        }, checks=[sums_to_one("weights"), _toy_checks]),
    }),
}


def run(params: dict, run, args) -> None:
    from scoresde.data import get_dataset

    p = params["prepare"]
    if p["dataset"] == "toy":
        kwargs = dict(p["toy"], seed=params["seed"])
    elif p["dataset"] == "digits":  # bundled with scikit-learn: nothing to read or download
        kwargs = {}
    else:
        kwargs = {"root": p["root"], "download": p["download"]}
    ds = get_dataset(p["dataset"], **kwargs)
    ds.write(OUT, meta={"seed": params["seed"]})
    counts = {s: int((ds.split == s).sum()) for s in ("train", "test")}
    shape = list(ds.x.shape[1:])
    print(f"[prepare] {p['dataset']}: {counts} examples of shape {shape} -> {OUT}")
    run.log_metrics({"n_train": counts["train"], "n_test": counts["test"]})
    run.set_tags({"dataset": p["dataset"], "data_shape": shape})


main = stage_main("prepare", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
