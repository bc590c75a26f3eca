"""Stage `classifier`: a small CNN trained on the real prepared data, the feature extractor of FID / KID.

Trains :class:`scoresde.classifier.SmallCNN` on the ``train`` split of data/prepared/data.parquet,
measures its accuracy on the held-out ``test`` split (a feature extractor that cannot classify is
worthless: the stage fails below ``classifier.min_accuracy``), and writes

- models/classifier.pt: ``{"model": state_dict, "config": {...}, "dataset", "extractor", "accuracy"}``
  (plain tensors and JSON-able values, loadable with ``torch.load(..., weights_only=True)``);
- reports/metrics/classifier.json: ``{"accuracy": ..., "extractor": "<dataset>_cnn", ...}``.

Toy data (2-D points) and unlabelled data (CelebA) have no classifier: the stage writes a checkpoint
without a model (``"skipped"`` says why) so the DAG stays the same for every dataset.
"""
from __future__ import annotations

from pipeline.params import COMMON, DEVICE, Float, Int, OrAuto, Section
from pipeline.stage import Timer, atomic_path, stage_main, write_json

DATA = "data/prepared/data.parquet"
OUT_MODEL = "models/classifier.pt"
OUT_METRICS = "reports/metrics/classifier.json"
# Accuracy a usable extractor must reach on the test split, per dataset (classifier.min_accuracy: auto).
MIN_ACCURACY = {"digits": 0.95, "mnist": 0.97, "cifar10": 0.6}

SCHEMA = {
    **COMMON,
    "classifier": Section({
        "device": DEVICE,
        "epochs": Int(30, ge=1, le=10_000),
        "batch_size": Int(128, ge=1, le=1_000_000),
        "lr": Float(2e-3, gt=0, le=1),
        "weight_decay": Float(5e-4, ge=0, le=1),
        "label_smoothing": Float(0.1, ge=0, lt=1),
        "shift": Int(1, ge=0, le=8),
        "width": Int(32, ge=1, le=1024),
        "feature_dim": Int(128, ge=2, le=8192),
        "min_accuracy": OrAuto(Float(ge=0, le=1), default="auto"),
        "threads": OrAuto(Int(ge=1, le=1024), default=1),
    }),
}


def skip(reason: str, dataset: str, run) -> None:
    import torch

    print(f"[classifier] {reason}: no classifier trained", flush=True)
    with atomic_path(OUT_MODEL) as tmp:
        torch.save({"model": None, "config": None, "dataset": dataset, "skipped": reason}, tmp)
    write_json(OUT_METRICS, {"dataset": dataset, "skipped": reason})
    run.set_tags({"dataset": dataset, "skipped": reason})


def run(params: dict, run, args) -> None:
    import torch

    from scoresde.training import resolve_device

    from pipeline.fidelity import extractor_name
    from scoresde.classifier import ClassifierConfig, accuracy, train_classifier
    from scoresde.data import load_prepared

    p = params["classifier"]
    train = load_prepared(DATA, split="train")
    dataset = train.meta["dataset"]
    if train.meta["kind"] != "image":
        return skip(f"{dataset} holds points, evaluated by sliced Wasserstein / mode weights", dataset, run)
    num_classes = int(train.labels.max()) + 1
    if len(torch.unique(train.labels)) < 2:
        return skip(f"{dataset} has no class labels (use Inception-v3: evaluate.inception_weights)", dataset, run)
    test = load_prepared(DATA, split="test")
    device = resolve_device(p["device"])
    threads = torch.get_num_threads()
    if device.type == "cpu" and p["threads"] != "auto":
        # Small convolutions gain nothing from more threads, and on shared cores they lose ~10x.
        torch.set_num_threads(p["threads"])
    c, h, w = train.meta["shape"]
    config = ClassifierConfig(in_channels=c, image_size=(h, w), num_classes=num_classes,
                              width=p["width"], feature_dim=p["feature_dim"])
    generator = torch.Generator().manual_seed(params["seed"])
    losses: list[float] = []

    def log(epoch: int, loss: float) -> None:
        losses.append(loss)
        run.log_metrics({"train_loss": loss}, step=epoch)

    with Timer() as timer:
        try:
            model = train_classifier(train.x, train.labels, config, epochs=p["epochs"], batch_size=p["batch_size"],
                                     lr=p["lr"], weight_decay=p["weight_decay"], shift=p["shift"],
                                     label_smoothing=p["label_smoothing"],
                                     generator=generator, device=device, log=log)
        finally:
            torch.set_num_threads(threads)
    acc = accuracy(model, test.x, test.labels)
    train_acc = accuracy(model, train.x, train.labels)
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
    with atomic_path(OUT_MODEL) as tmp:
        torch.save({"model": state, "config": config.to_dict(), "dataset": dataset, "extractor": name,
                    "accuracy": acc}, tmp)
    write_json(OUT_METRICS, {**metrics, "dataset": dataset, "extractor": name, "min_accuracy": threshold})


main = stage_main("classifier", SCHEMA, run)

if __name__ == "__main__":
    raise SystemExit(main())
