"""Stage `prepare`: dataset -> data/prepared/data.parquet (uint8 images or 2-D points, labels, split).

Decoding happens once here; later stages read Parquet columns (scoresde.data.load_prepared).
"""
from __future__ import annotations

from pipeline.params import COMMON
from pipeline.schemas import PREPARE
from pipeline.stage import stage_main

OUT = "data/prepared/data.parquet"
SCHEMA = {**COMMON, "prepare": PREPARE}


def run(params: dict, run, args) -> None:
    from scoresde.datasets import get_dataset

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
    run.log_dataset(OUT, p["dataset"])


main = stage_main("prepare", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
