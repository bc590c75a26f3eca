"""Datasets by name: the registry, checksum-verified loaders of the raw files, and their errors.

Registry (:data:`DATASETS`, :func:`get_dataset`)
-----------------------------------------------
``get_dataset(name, **kwargs) -> RawDataset`` with ``x`` (uint8 images ``(N, C, H, W)`` or float32 points
``(N, D)``), ``labels`` (int64), ``split`` (``"train"``/``"test"`` strings) and ``meta``:

- ``toy``: the 2-D Gaussian mixture of the article (Song & Ermon, 2019, Fig. 2/3: weights 0.8/0.2, means
  (5, 5)/(−5, −5), std 1), drawn with ``scoresde.toy.GaussianMixture`` and a seeded ``torch.Generator``.
- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, no download); values 0..16 → 0..255.
- ``mnist``, ``cifar10``, ``celeba``: the file-based image datasets, loaded by
  :mod:`scoresde.image_datasets` (imported at the end of this module, so they are registered whenever
  this module is).

Real datasets are read from ``root`` (default ``data/raw``); ``download=True`` fetches them (torchvision
verifies the download's MD5) only when asked. Absent files raise :class:`DatasetNotFoundError` naming
each file, its MD5 and where to put it; a truncated or corrupted file raises
:class:`DatasetCorruptedError` naming the file.

Writing a :class:`RawDataset` to the prepared-data Parquet file every later stage reads is
:func:`scoresde.data.write_prepared` (``RawDataset.write``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from scoresde.data import DatasetCorruptedError, DatasetError, DatasetNotFoundError

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetCorruptedError",
    "RawDataset",
    "DATASETS",
    "register_dataset",
    "get_dataset",
    "dataset_names",
    "load_toy",
    "load_digits",
    "md5sum",
    "verify_md5",
]

DEFAULT_ROOT = "data/raw"


# ----------------------------------------------------------------------------------------------------
# Errors and checksums
# ----------------------------------------------------------------------------------------------------


# The errors live with the prepared-data reader, which raises them too.
def md5sum(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str, size: int | None = None) -> str:
    """Check ``path`` against the publisher's MD5; raise :class:`DatasetCorruptedError` naming it if not."""
    path = Path(path)
    actual = md5sum(path)
    if actual != expected:
        n = path.stat().st_size
        size_note = f"{n} bytes" + (f", expected {size} bytes" if size is not None and size != n else "")
        raise DatasetCorruptedError(
            f"{path.name} is corrupted or truncated: md5 {actual} ({size_note}) does not match the "
            f"publisher's md5 {expected}. File: {path}. Delete it and put a fresh copy there "
            f"(or pass download=True on a machine with internet)."
        )
    return actual


# ----------------------------------------------------------------------------------------------------
# Raw datasets and the registry
# ----------------------------------------------------------------------------------------------------


@dataclass
class RawDataset:
    """A dataset as arrays: ``x`` uint8 ``(N, C, H, W)`` images or float32 ``(N, D)`` points, ``labels``
    int64 ``(N,)``, ``split`` strings ``(N,)``; ``meta`` is JSON-able provenance (params, files, MD5s)."""

    name: str
    x: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> np.ndarray:
        if self.x.ndim != 4:
            raise AttributeError(f"dataset {self.name!r} holds points of shape {self.x.shape}, not images")
        return self.x

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, split: str) -> "RawDataset":
        keep = self.split == split
        return RawDataset(self.name, self.x[keep], self.labels[keep], self.split[keep], dict(self.meta))

    def write(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
        """:func:`scoresde.data.write_prepared` of this dataset (``meta`` is merged over ``self.meta``)."""
        from scoresde.data import write_prepared  # imported here: scoresde.data imports this module

        return write_prepared(path, self.x, self.labels, self.split, self.name, {**self.meta, **(meta or {})})


DATASETS: dict[str, Callable[..., RawDataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., RawDataset]], Callable[..., RawDataset]]:
    """Decorator adding a loader ``fn(**kwargs) -> RawDataset`` to :data:`DATASETS` under ``name``."""

    def deco(fn: Callable[..., RawDataset]) -> Callable[..., RawDataset]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = fn
        return fn

    return deco


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str, **kwargs: Any) -> RawDataset:
    """Load the dataset registered as ``name`` with the loader's keyword arguments.

    Unknown names or keyword arguments raise ``ValueError`` listing the valid ones.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    loader = DATASETS[name]
    valid = list(inspect.signature(loader).parameters)
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for dataset {name!r}; valid options: {', '.join(valid)}")
    return loader(**kwargs)


def _split_array(names: Iterable[str], counts: Iterable[int]) -> np.ndarray:
    return np.concatenate([np.full(int(c), s, dtype=object) for s, c in zip(names, counts)] or
                          [np.empty(0, dtype=object)])


# ----------------------------------------------------------------------------------------------------
# toy and digits (no files needed)
# ----------------------------------------------------------------------------------------------------


@register_dataset("toy")
def load_toy(
    weights: Sequence[float] = (0.8, 0.2),
    means: Sequence[Sequence[float]] = ((5.0, 5.0), (-5.0, -5.0)),
    std: float = 1.0,
    n: int = 10000,
    n_test: int = 0,
    seed: int = 0,
) -> RawDataset:
    """Samples of the isotropic 2-D Gaussian mixture Σ_k w_k N(μ_k, std²I) (Song & Ermon, 2019, Sec. 3.2).

    ``n`` training then ``n_test`` test points are drawn with ``scoresde.toy.GaussianMixture.sample`` from
    one ``torch.Generator`` seeded with ``seed``. ``labels`` are the mixture component each point was drawn
    from (``sample(..., return_labels=True)``; for a sampler without labels, the most probable component,
    which for the article's well-separated modes is the drawing component but with negligible probability).
    """
    from scoresde.toy import GaussianMixture  # imported lazily: scoresde.toy is another module's job

    weights = [float(w) for w in weights]
    means = [[float(v) for v in m] for m in means]
    if n < 1 or n_test < 0:
        raise ValueError(f"toy: n must be >= 1 and n_test >= 0, got n={n}, n_test={n_test}")
    mixture = GaussianMixture(weights, means, float(std))
    gen = torch.Generator().manual_seed(int(seed))

    def draw(count: int) -> tuple[np.ndarray, np.ndarray]:
        if "return_labels" in inspect.signature(mixture.sample).parameters:
            out = mixture.sample(count, generator=gen, return_labels=True)
        else:
            out = mixture.sample(count, generator=gen)
        comp = None
        if isinstance(out, tuple):
            out, comp = out[0], out[1]
        x = torch.as_tensor(out, dtype=torch.float64)
        if comp is None:
            mu = torch.tensor(means, dtype=torch.float64)
            logits = torch.log(torch.tensor(weights, dtype=torch.float64)) - torch.cdist(x, mu) ** 2 / (
                2.0 * float(std) ** 2
            )
            comp = logits.argmax(dim=1)
        return x.to(torch.float32).numpy(), torch.as_tensor(comp).to(torch.int64).numpy()

    x_tr, y_tr = draw(int(n))
    parts_x, parts_y, names, counts = [x_tr], [y_tr], ["train"], [int(n)]
    if n_test:
        x_te, y_te = draw(int(n_test))
        parts_x.append(x_te)
        parts_y.append(y_te)
        names.append("test")
        counts.append(int(n_test))
    meta = {"weights": weights, "means": means, "std": float(std), "n": int(n), "n_test": int(n_test),
            "seed": int(seed)}
    return RawDataset("toy", np.concatenate(parts_x), np.concatenate(parts_y), _split_array(names, counts), meta)


@register_dataset("digits")
def load_digits(n_test: int = 297) -> RawDataset:
    """scikit-learn's bundled 8×8 handwritten digits (UCI optdigits test set; 1,797 images, no download).

    Pixel counts 0..16 become uint8 ``floor(v·255/16 + 0.5)`` (0..255); shape ``(1797, 1, 8, 8)``. The
    split is deterministic: the last ``n_test`` images (default 297) are ``"test"``, the rest ``"train"``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    v = np.asarray(bunch.images, dtype=np.float64)
    if v.min() < 0 or v.max() > 16:
        raise DatasetCorruptedError(f"sklearn digits: values outside 0..16 ({v.min()}..{v.max()})")
    x = np.floor(v * 255.0 / 16.0 + 0.5).astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    n = len(x)
    if not 0 <= n_test < n:
        raise ValueError(f"digits: n_test must be in [0, {n}), got {n_test}")
    split = _split_array(["train", "test"], [n - n_test, n_test])
    meta = {"source": "sklearn.datasets.load_digits", "n_test": int(n_test), "scale": "round(v*255/16)"}
    return RawDataset("digits", x, labels, split, meta)


# The file-based image datasets (mnist, cifar10, celeba) register themselves on import; imported last,
# once every name they take from this module exists.
from scoresde import image_datasets as _image_datasets  # noqa: E402,F401
