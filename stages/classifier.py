"""Stage `classifier`: a small CNN trained on the real prepared data, the feature extractor of FID / KID.

Trains scoresde.classifier.SmallCNN on the `train` split of data/prepared/data.parquet and measures its
accuracy on the held-out `test` split (an extractor that cannot classify is worthless: the stage fails
below `classifier.min_accuracy`). Writes models/classifier.pt (`{"model": state_dict, "config", "dataset",
"extractor", "accuracy"}`, weights-only loadable, byte-identical across runs) and
reports/metrics/classifier.json. Toy data (points) and unlabelled data (CelebA) have no classifier: the
stage writes a checkpoint without a model (`"skipped"` says why) so the DAG is the same for every dataset.
"""
from __future__ import annotations

from pipeline.io import Timer, write_json
from pipeline.params import COMMON
from pipeline.schemas import CLASSIFIER, MIN_ACCURACY
from pipeline.stage import stage_main

DATA = "data/prepared/data.parquet"
OUT_MODEL = "models/classifier.pt"
OUT_METRICS = "reports/metrics/classifier.json"
SCHEMA = {**COMMON, "classifier": CLASSIFIER}


def run(params: dict, run, args) -> None:
    import torch

    from pipeline.fidelity import extractor_name
    from scoresde.checkpoint import atomic_torch_save
    from scoresde.classifier import ClassifierConfig, accuracy, train_classifier
    from scoresde.data import load_prepared
    from scoresde.distributed import resolve_device

    p = params["classifier"]
    train = load_prepared(DATA, split="train")
    dataset = train.meta["dataset"]
    skipped = (f"{dataset} holds points, evaluated by sliced Wasserstein / mode weights" if train.meta["kind"] != "image"
               else f"{dataset} has no class labels (use Inception-v3: evaluate.inception_weights)"
               if len(torch.unique(train.labels)) < 2 else None)
    if skipped:
        print(f"[classifier] {skipped}: no classifier trained", flush=True)
        atomic_torch_save({"model": None, "config": None, "dataset": dataset, "skipped": skipped}, OUT_MODEL)
        write_json(OUT_METRICS, {"dataset": dataset, "skipped": skipped})
        run.set_tags({"dataset": dataset, "skipped": skipped})
        return
    test = load_prepared(DATA, split="test")
    device = resolve_device(p["device"])
    threads = torch.get_num_threads()
    if device.type == "cpu" and p["threads"] != "auto":
        torch.set_num_threads(p["threads"])  # small convolutions gain nothing from more threads, lose on shared cores
    c, h, w = train.meta["shape"]
    config = ClassifierConfig(in_channels=c, image_size=(h, w), num_classes=int(train.labels.max()) + 1,
                              width=p["width"], feature_dim=p["feature_dim"])
    losses: list[float] = []

    def log(epoch: int, loss: float) -> None:
        losses.append(loss)
        run.log_metrics({"train_loss": loss}, step=epoch)

    with Timer() as timer:
        try:
            model = train_classifier(train.x, train.labels, config, epochs=p["epochs"], batch_size=p["batch_size"],
                                     lr=p["lr"], weight_decay=p["weight_decay"], shift=p["shift"],
                                     label_smoothing=p["label_smoothing"],
                                     generator=torch.Generator().manual_seed(params["seed"]), device=device, log=log)
        finally:
            torch.set_num_threads(threads)
    acc, train_acc = accuracy(model, test.x, test.labels), accuracy(model, train.x, train.labels)
    name = extractor_name(dataset)
    threshold = MIN_ACCURACY.get(dataset, 0.0) if p["min_accuracy"] == "auto" else p["min_accuracy"]
    print(f"[classifier] {dataset}: test accuracy {acc:.4f} (train {train_acc:.4f}, {len(test)} test images, "
          f"{timer.seconds:.1f} s) -> extractor {name!r}", flush=True)
    metrics = {"accuracy": acc, "train_accuracy": train_acc, "final_loss": losses[-1], "seconds": timer.seconds,
               "n_train": len(train), "n_test": len(test)}
    run.log_metrics(metrics)
    run.set_tags({"dataset": dataset, "extractor": name})
    if acc < threshold:
        raise SystemExit(f"[classifier] test accuracy {acc:.4f} < classifier.min_accuracy {threshold}: "
                         f"its features would make FID meaningless (train longer: classifier.epochs)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"model": state, "config": config.to_dict(), "dataset": dataset, "extractor": name,
                       "accuracy": acc}, OUT_MODEL)
    write_json(OUT_METRICS, {**metrics, "dataset": dataset, "extractor": name, "min_accuracy": threshold})
    run.log_artifact(OUT_METRICS, "metrics")


main = stage_main("classifier", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
