"""Sample quality of a set of samples against the cached reference of the ``fid_ref`` stage.

One function, :func:`sample_quality`, serves every stage that scores samples (``evaluate@*``,
``annealing``, ``ablation@*``, ``samplers``):

- images (uint8 ``(N, C, H, W)`` or floats in [0, 1]): FID and KID through torch-fidelity
  (:func:`pipeline.fidelity.compute_fid_kid`) for every extractor of the reference, named
  ``fid_<extractor>_n<N>``, ``kid_<extractor>_n<N>``, ``kid_std_<extractor>_n<N>``, and the FID's uncertainty
  ``fid_<extractor>_n<N>_std`` (std of the FID over :data:`FID_BOOTSTRAP` bootstrap resamples of the
  generated samples; :func:`pipeline.fidelity.fid_bootstrap`);
- 2-D points (the toy data): ``sliced_wasserstein_n<N>`` and ``mode_weight_error_n<N>``.

The returned dict also carries ``extractors`` (metric tags, the first is the headline one) and ``n``.
Readers (the report, the README table) compose metric names from those two fields with
:func:`quality_keys`; nobody parses numbers or extractors back out of metric names.
"""
from __future__ import annotations

from typing import Any

REFERENCE = "data/fid/ref_stats.npz"
CLASSIFIER = "models/classifier.pt"
POINTS = "points"  # the "extractor" of toy data: distances between point sets, no features
FID_BOOTSTRAP = 200  # resamples behind every fid_..._std (200 puts the std's own relative error near 5 %)
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def significant(a: float, a_std: float, b: float, b_std: float) -> bool:
    """Whether two independent scores differ at the 95 % level: the normal approximation of the bootstrap
    interval of the difference, |a − b| > 1.96 · sqrt(std_a² + std_b²), excludes 0."""
    return abs(a - b) > Z95 * (a_std ** 2 + b_std ** 2) ** 0.5


def compare(a: float, a_std: float, b: float, b_std: float, digits: int = 3) -> str:
    """``Δ = −1.23 ± 0.45 (95 %: significant)`` or ``... not distinguishable`` for report text."""
    d, s = a - b, (a_std ** 2 + b_std ** 2) ** 0.5
    verdict = "significant" if significant(a, a_std, b, b_std) else "not distinguishable"
    return f"Δ = {d:+.{digits}g} ± {Z95 * s:.{digits}g} (95 %): {verdict}"


def quality_keys(extractor: str, n: int) -> dict[str, str]:
    """Metric names of one extractor at sample size ``n``; the first entry is the headline score."""
    if extractor == POINTS:
        return {"sliced_wasserstein": f"sliced_wasserstein_n{n}", "mode_weight_error": f"mode_weight_error_n{n}"}
    return {"fid": f"fid_{extractor}_n{n}", "fid_std": f"fid_{extractor}_n{n}_std", "kid": f"kid_{extractor}_n{n}",
            "kid_std": f"kid_std_{extractor}_n{n}"}


def real_keys(extractor: str, split: str, n: int) -> dict[str, str]:
    """Names of the real-vs-real floor the ``fid_ref`` stage measures (``fid_<extractor>_real_<split>_n<n>``)."""
    return {"fid": f"fid_{extractor}_real_{split}_n{n}", "kid": f"kid_{extractor}_real_{split}_n{n}",
            "kid_std": f"kid_std_{extractor}_real_{split}_n{n}"}


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(name, value) of the headline score of a dict written by :func:`sample_quality` (None if absent)."""
    if not metrics.get("extractors") or "n" not in metrics:
        return None
    key = next(iter(quality_keys(metrics["extractors"][0], int(metrics["n"])).values()))
    return (key, metrics[key]) if key in metrics else None


def headline_std(metrics: dict[str, Any]) -> float | None:
    """The uncertainty (``fid_..._std``) of the headline score, when the dict has one."""
    if not metrics.get("extractors") or "n" not in metrics:
        return None
    value = metrics.get(quality_keys(metrics["extractors"][0], int(metrics["n"])).get("fid_std", ""))
    return None if value is None else float(value)


def describe(metrics: dict[str, Any]) -> str:
    """``fid_digits_cnn_n200 = 13.1 ± 0.6`` for figure titles and logs."""
    h, s = headline(metrics), headline_std(metrics)
    return (f"{h[0]} = {h[1]:.3g}" + (f" ± {s:.2g}" if s is not None else "")) if h else ""


def evaluate_points(x, extra: dict, n: int, projections: int, seed: int) -> dict[str, float]:
    """Sliced Wasserstein distance to the reference points and the mode-weight error of the true mixture."""
    import torch

    from scoresde.metrics import mode_weight_error, sliced_wasserstein
    from scoresde.toy import GaussianMixture

    x = torch.as_tensor(x, dtype=torch.float32)[:n]
    mixture = GaussianMixture(torch.as_tensor(extra["mixture_weights"]), torch.as_tensor(extra["mixture_means"]),
                              float(extra["mixture_std"]))
    g = torch.Generator().manual_seed(seed)
    keys = quality_keys(POINTS, n)
    return {keys["sliced_wasserstein"]: sliced_wasserstein(x, torch.as_tensor(extra["points"]), projections, generator=g),
            keys["mode_weight_error"]: mode_weight_error(x, mixture)}


def sample_quality(x, seed: int, device, n: int | None = None, *, batch_size: int = 256, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, sw_projections: int = 128, reference: str = REFERENCE,
                   classifier: str = CLASSIFIER, on_extractors=None, fid_bootstrap: int = FID_BOOTSTRAP
                   ) -> dict[str, Any]:
    """Quality of the first ``n`` samples ``x`` (all when None) against the cached reference; see the module doc.

    ``on_extractors(names, extra)`` is called once the reference is read (the evaluate stage logs its
    extractor choice through it).
    """
    import numpy as np
    import torch

    from pipeline import fidelity as fd
    from scoresde.data import to_uint8

    refs, extra = fd.load_references(reference)
    n = len(x) if n is None else int(n)
    if n > len(x):
        raise ValueError(f"asked for the quality of {n} samples, only {len(x)} are there")
    if on_extractors is not None:
        on_extractors(list(refs) or [POINTS], extra)
    if str(extra["kind"]) == POINTS:
        return {**evaluate_points(x, extra, n, sw_projections, seed), "extractors": [POINTS], "n": n}
    images = x if isinstance(x, np.ndarray) and x.dtype == np.uint8 else to_uint8(torch.as_tensor(x))
    shape = [int(s) for s in extra["shape"]]
    if list(images.shape[1:]) != shape:
        raise ValueError(f"samples of shape {list(images.shape[1:])} against a reference of {extra['dataset']} "
                         f"images {shape}: re-run the sample stage for this dataset")
    device = torch.device(device)
    metrics: dict[str, Any] = {}
    for name, ref in refs.items():
        weights = fd.prepare_extractor(name, extra, classifier, device)
        metrics.update(fd.compute_fid_kid(images, ref, name, n, cuda=device.type == "cuda", batch_size=batch_size,
                                          kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
                                          weights_path=weights, fid_bootstrap_n=fid_bootstrap))
    return {**metrics, "extractors": [fd.metric_tag(name) for name in refs], "n": n}


# ------------------------------------------------------------------ the reference (stage fid_ref)
def save_points_reference(path: str, x_ref, dataset: str, toy: dict) -> None:
    """Toy data: the reference points and the true mixture (``prepare.toy``) for the point metrics."""
    import numpy as np

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, kind=np.array(POINTS), dataset=np.array(dataset), points=x_ref.numpy().astype(np.float32),
                 mixture_weights=np.array(toy["weights"], dtype=np.float64),
                 mixture_means=np.array(toy["means"], dtype=np.float64), mixture_std=np.array(toy["std"]))


def available_extractors(dataset: str, e: dict, classifier: str = CLASSIFIER, device="cpu"):
    """Extractors usable for ``dataset``: its trained classifier (registered with torch-fidelity) and
    Inception-v3 when its weights resolve. Returns (names, inception weights path or None, messages)."""
    import torch

    from pipeline import fidelity as fd

    names, messages = [], []
    ckpt = torch.load(classifier, map_location="cpu", weights_only=True)
    if ckpt.get("model") is not None:
        model, _ = fd.load_classifier(classifier, device)
        names.append(fd.register_classifier(fd.extractor_name(dataset), model))
    else:
        messages.append(f"no classifier ({ckpt.get('skipped')})")
    ok, weights, message = fd.resolve_inception(e["inception_weights"], e["inception_download"])
    fd.log(message, "fid_ref")
    messages.append(message)
    if ok:
        names.append(fd.INCEPTION)
    return names, weights, messages


def image_references(u8, names: list[str], weights, e: dict, device, other=None, other_split: str = "",
                     seed: int = 0):
    """Reference features/statistics of uint8 images ``u8`` per extractor, and — with held-out real images
    ``other`` — the real-vs-real floor named by :func:`real_keys`. Returns (references, floor metrics)."""
    from pipeline import fidelity as fd

    references, floor = [], {}
    for name in names:
        kw = {"cuda": device.type == "cuda", "batch_size": e["batch_size"],
              "weights_path": weights if name == fd.INCEPTION else None}
        ref = fd.reference_statistics(u8, name, **kw)
        references.append(ref)
        print(f"[fid_ref] {name}: features {tuple(ref.features.shape)} of {len(u8)} images", flush=True)
        if other is not None:  # real vs real: the floor of FID / KID with this many samples
            real = fd.compute_fid_kid(other, ref, name, len(other), kid_subsets=e["kid_subsets"],
                                      kid_subset_size=e["kid_subset_size"], seed=seed, **kw)
            keys = quality_keys(fd.metric_tag(name), len(other))
            floor.update({v: real[keys[k]] for k, v in real_keys(fd.metric_tag(name), other_split, len(other)).items()})
    return references, floor
