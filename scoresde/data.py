"""Datasets by name, and the prepared-data Parquet format every later stage reads.

Registry (:data:`DATASETS`, :func:`get_dataset`)
-----------------------------------------------
``get_dataset(name, **kwargs) -> RawDataset`` with ``x`` (uint8 images ``(N, C, H, W)`` or float32 points
``(N, D)``), ``labels`` (int64), ``split`` (``"train"``/``"test"`` strings) and ``meta``:

- ``toy``: the 2-D Gaussian mixture of the article (Song & Ermon, 2019, Fig. 2/3: weights 0.8/0.2, means
  (5, 5)/(−5, −5), std 1), drawn with ``scoresde.toy.GaussianMixture`` and a seeded ``torch.Generator``.
- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, no download); values 0..16 → 0..255.
- ``mnist``: the IDX files (LeCun et al.), read split by split, each file MD5-verified against the
  publisher's checksum before it is parsed.
- ``cifar10``: the python batches through ``torchvision.datasets.CIFAR10`` (MD5-verified first; the
  batches are pickles, so an unverified file is never unpickled).
- ``celeba``: aligned CelebA through ``torchvision.datasets.CelebA``, centre-cropped to 140 and resized
  to 64 as NCSN does (Song & Ermon, 2019, App. B.1).

Real datasets are read from ``root`` (default ``data/raw``); ``download=True`` fetches them (torchvision
verifies the download's MD5) only when asked. Absent files raise :class:`DatasetNotFoundError` naming
each file, its MD5 and where to put it; a truncated or corrupted file raises
:class:`DatasetCorruptedError` naming the file.

Prepared data (:func:`write_prepared`, :func:`load_prepared`)
-------------------------------------------------------------
One Parquet file written atomically with pyarrow: images as ``image`` (binary, C·H·W uint8 bytes) or
points as ``x`` (list<float32>), ``label`` (int64), ``split`` (string); schema metadata
``scoresde.shape`` (JSON list), ``scoresde.dataset``, ``scoresde.kind`` and ``scoresde.meta`` (JSON).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetCorruptedError",
    "RawDataset",
    "PreparedData",
    "DATASETS",
    "register_dataset",
    "get_dataset",
    "dataset_names",
    "load_toy",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "load_celeba",
    "read_idx",
    "md5sum",
    "verify_md5",
    "write_prepared",
    "load_prepared",
    "to_model_space",
    "from_model_space",
    "to_uint8",
    "MNIST_FILES",
]

DEFAULT_ROOT = "data/raw"


# ----------------------------------------------------------------------------------------------------
# Errors and checksums
# ----------------------------------------------------------------------------------------------------


class DatasetError(Exception):
    """Base class of the dataset errors below."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset's files are absent (and no download was asked for, or it failed)."""


class DatasetCorruptedError(DatasetError, ValueError):
    """A dataset file is present but truncated or corrupted (checksum or format mismatch)."""


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
        """:func:`write_prepared` of this dataset (``meta`` is merged over ``self.meta``)."""
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


# ----------------------------------------------------------------------------------------------------
# MNIST (IDX files)
# ----------------------------------------------------------------------------------------------------

# Publisher MD5s (the same as torchvision.datasets.MNIST.resources) and sizes of the gzipped IDX files.
MNIST_FILES: dict[str, dict[str, Any]] = {
    "train-images-idx3-ubyte.gz": {"md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "size": 9912422},
    "train-labels-idx1-ubyte.gz": {"md5": "d53e105ee54ea40749a09fcbcd1e9432", "size": 28881},
    "t10k-images-idx3-ubyte.gz": {"md5": "9fb629c4189551a2d022fa330f9573f3", "size": 1648877},
    "t10k-labels-idx1-ubyte.gz": {"md5": "ec29112dd5afa0611ce80d1b7f02629c", "size": 4542},
}
_MNIST_SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format; gzip-compressed when the name ends in ``.gz``).

    Header: two zero bytes, a type code, the number of dimensions, then one big-endian uint32 per
    dimension. A bad header, a truncated stream or a length mismatch raises
    :class:`DatasetCorruptedError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetCorruptedError(f"{path.name} cannot be decompressed ({e}); file: {path}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetCorruptedError(f"{path.name} is not an IDX file (bad magic number); file: {path}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetCorruptedError(f"{path.name} is truncated (incomplete IDX header); file: {path}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DatasetCorruptedError(
            f"{path.name} is truncated or corrupted: {len(data)} bytes after decompression, expected "
            f"{expected} for an IDX array of shape {dims}; file: {path}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _mnist_dirs(root: Path) -> list[Path]:
    return [root, root / "mnist", root / "MNIST" / "raw", root / "mnist" / "MNIST" / "raw"]


def _find_file(dirs: Sequence[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _mnist_missing_message(root: Path, missing: Sequence[str], available: Sequence[str], why: str) -> str:
    lines = [f"MNIST: {why}. Put these files (gzipped IDX, as published) in {root.resolve()} "
             f"(or {root.resolve() / 'MNIST' / 'raw'}, torchvision's layout):"]
    for name in missing:
        info = MNIST_FILES[name]
        lines.append(f"  - {name}  (md5 {info['md5']}, {info['size']} bytes)")
    lines.append("or pass download=True on a machine with internet.")
    if available:
        lines.append(f"Splits complete in this folder: {', '.join(available)} "
                     f"(load them with splits={tuple(available)!r} or splits='available').")
    return "\n".join(lines)


@register_dataset("mnist")
def load_mnist(
    root: str | os.PathLike = DEFAULT_ROOT,
    splits: Sequence[str] | str = ("train", "test"),
    download: bool = False,
    verify: bool = True,
    limit: int | None = None,
) -> RawDataset:
    """MNIST (LeCun, Cortes & Burges) from the four gzipped IDX files under ``root``.

    Files are looked up in ``root``, ``root/mnist`` and torchvision's ``root/MNIST/raw``. Only the files of
    the requested ``splits`` are needed (``splits="available"`` loads every split whose image and label
    files are both present). Each file's MD5 is checked against the publisher's before it is parsed
    (``verify=False`` skips this; the IDX length check still catches truncation). ``download=True`` uses
    ``torchvision.datasets.MNIST(root, download=True)`` (which verifies the MD5s) when a file is missing.
    ``limit`` keeps the first ``limit`` images of each split. Images: uint8 ``(N, 1, 28, 28)``.
    """
    root = Path(root)
    dirs = _mnist_dirs(root)
    complete = [s for s, (im, lb, _) in _MNIST_SPLITS.items()
                if _find_file(dirs, im) is not None and _find_file(dirs, lb) is not None]
    if splits == "available":
        if not complete and not download:
            raise DatasetNotFoundError(_mnist_missing_message(
                root, list(MNIST_FILES), [], f"no complete split (images + labels) under {root}"))
        wanted = complete or list(_MNIST_SPLITS)
    else:
        wanted = [splits] if isinstance(splits, str) else list(splits)
        bad = [s for s in wanted if s not in _MNIST_SPLITS]
        if bad or not wanted:
            raise ValueError(f"mnist: unknown split(s) {bad}; valid: {list(_MNIST_SPLITS)} or 'available'")

    def missing_files() -> list[str]:
        return [f for s in wanted for f in _MNIST_SPLITS[s][:2] if _find_file(dirs, f) is None]

    if missing_files() and download:
        try:
            from torchvision.datasets import MNIST

            MNIST(str(root), train=True, download=True)
        except Exception as e:  # offline, mirror down, checksum mismatch ...
            raise DatasetNotFoundError(_mnist_missing_message(
                root, missing_files(), complete, f"download failed ({type(e).__name__}: {e})")) from e
    missing = missing_files()
    if missing:
        raise DatasetNotFoundError(_mnist_missing_message(
            root, missing, complete, f"missing file(s) for split(s) {wanted} under {root}"))

    xs, ys, counts, files = [], [], [], {}
    for s in wanted:
        im_name, lb_name, n_expected = _MNIST_SPLITS[s]
        arrays = []
        for name in (im_name, lb_name):
            path = _find_file(dirs, name)
            assert path is not None
            if verify:
                verify_md5(path, MNIST_FILES[name]["md5"], MNIST_FILES[name]["size"])
            arrays.append(read_idx(path))
            files[name] = {"md5": MNIST_FILES[name]["md5"], "verified": bool(verify)}
        images, labels = arrays
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DatasetCorruptedError(f"{im_name}: expected uint8 images (N, 28, 28), got "
                                        f"{images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images) or len(images) != n_expected:
            raise DatasetCorruptedError(f"{lb_name}/{im_name}: expected {n_expected} images and labels, got "
                                        f"{len(images)} and {len(labels)}")
        if labels.max(initial=0) > 9:
            raise DatasetCorruptedError(f"{lb_name}: labels outside 0..9")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        xs.append(images[:, None, :, :])
        ys.append(labels.astype(np.int64))
        counts.append(len(images))
    meta = {"splits": wanted, "files": files, "limit": limit}
    return RawDataset("mnist", np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys),
                      _split_array(wanted, counts), meta)


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 (torchvision)
# ----------------------------------------------------------------------------------------------------

_CIFAR_ARCHIVE_SIZE = 170498071


def _cifar_files() -> tuple[str, str, str, list[tuple[str, str]]]:
    """(archive name, archive md5, batches folder, [(file, md5), ...]) from torchvision's CIFAR10 class."""
    from torchvision.datasets import CIFAR10

    files = [tuple(f) for f in CIFAR10.train_list + CIFAR10.test_list]
    files.append((CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    return CIFAR10.filename, CIFAR10.tgz_md5, CIFAR10.base_folder, files  # type: ignore[return-value]


def _cifar_missing_message(root: Path, archive: str, archive_md5: str, folder: str,
                           files: Sequence[tuple[str, str]], why: str) -> str:
    r = root.resolve()
    lines = [f"CIFAR-10: {why}. Put {archive} (md5 {archive_md5}, {_CIFAR_ARCHIVE_SIZE} bytes; the python "
             f"version from https://www.cs.toronto.edu/~kriz/cifar.html) in {r}, or its extracted folder "
             f"{r / folder} holding:"]
    lines += [f"  - {name}  (md5 {md5})" for name, md5 in files]
    lines.append("or pass download=True on a machine with internet.")
    return "\n".join(lines)


@register_dataset("cifar10")
def load_cifar10(
    root: str | os.PathLike = DEFAULT_ROOT,
    splits: Sequence[str] | str = ("train", "test"),
    download: bool = False,
    limit: int | None = None,
) -> RawDataset:
    """CIFAR-10 (Krizhevsky, 2009) through ``torchvision.datasets.CIFAR10``; uint8 ``(N, 3, 32, 32)``.

    Looks for ``cifar-10-batches-py/`` (or the ``cifar-10-python.tar.gz`` archive, extracted after its MD5
    is checked) in ``root`` or ``root/cifar10``. Every batch file is MD5-verified against torchvision's
    published checksums before torchvision unpickles it — the batches are pickles, so verification is
    not optional. ``limit`` keeps the first ``limit`` images of each split.
    """
    archive, archive_md5, folder, files = _cifar_files()
    root = Path(root)
    wanted = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in wanted if s not in ("train", "test")]
    if bad or not wanted:
        raise ValueError(f"cifar10: unknown split(s) {bad}; valid: ['train', 'test']")

    base = next((b for b in (root, root / "cifar10") if (b / folder).is_dir() or (b / archive).is_file()), None)
    if base is not None and not (base / folder).is_dir():
        from torchvision.datasets.utils import extract_archive

        verify_md5(base / archive, archive_md5, _CIFAR_ARCHIVE_SIZE)
        extract_archive(str(base / archive), str(base))
    if base is None and download:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
            base = root
        except Exception as e:
            raise DatasetNotFoundError(_cifar_missing_message(
                root, archive, archive_md5, folder, files, f"download failed ({type(e).__name__}: {e})")) from e
    if base is None:
        raise DatasetNotFoundError(_cifar_missing_message(
            root, archive, archive_md5, folder, files, f"nothing found under {root}"))
    missing = [(n, m) for n, m in files if not (base / folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(_cifar_missing_message(
            root, archive, archive_md5, folder, missing, f"incomplete folder {base / folder}"))
    for name, md5 in files:
        verify_md5(base / folder / name, md5)

    from torchvision.datasets import CIFAR10

    xs, ys, counts = [], [], []
    classes: list[str] = []
    for s in wanted:
        ds = CIFAR10(str(base), train=(s == "train"), download=False)
        data = np.asarray(ds.data)[:limit].transpose(0, 3, 1, 2)
        xs.append(np.ascontiguousarray(data, dtype=np.uint8))
        ys.append(np.asarray(ds.targets, dtype=np.int64)[:limit])
        counts.append(len(data))
        classes = list(ds.classes)
    meta = {"splits": wanted, "files": {n: {"md5": m, "verified": True} for n, m in files},
            "classes": classes, "limit": limit}
    return RawDataset("cifar10", np.concatenate(xs), np.concatenate(ys), _split_array(wanted, counts), meta)


# ----------------------------------------------------------------------------------------------------
# CelebA (torchvision), centre crop 140 → 64 as NCSN
# ----------------------------------------------------------------------------------------------------


def _celeba_files() -> list[tuple[str, str]]:
    from torchvision.datasets import CelebA

    return [(name, md5) for _, md5, name in CelebA.file_list]


def _celeba_missing_message(folder: Path, files: Sequence[tuple[str, str]], why: str) -> str:
    lines = [f"CelebA: {why}. Put these files (aligned-and-cropped CelebA, as published) in "
             f"{folder.resolve()}:"]
    for name, md5 in files:
        if name == "img_align_celeba.zip":
            lines.append(f"  - img_align_celeba/ (the extracted images) or {name}  (md5 {md5})")
        else:
            lines.append(f"  - {name}  (md5 {md5})")
    lines.append("or pass download=True on a machine with internet (Google Drive quotas often refuse).")
    return "\n".join(lines)


@register_dataset("celeba")
def load_celeba(
    root: str | os.PathLike = DEFAULT_ROOT,
    splits: Sequence[str] | str = ("train", "test"),
    download: bool = False,
    limit: int | None = None,
    crop: int = 140,
    size: int = 64,
) -> RawDataset:
    """Aligned CelebA (Liu et al., 2015) through ``torchvision.datasets.CelebA``; uint8 ``(N, 3, 64, 64)``.

    Each image is centre-cropped to ``crop`` = 140 and resized to ``size`` = 64, as NCSN does for CelebA
    (Song & Ermon, 2019, App. B.1). Files live in ``root/celeba/`` (torchvision's layout; ``root`` itself
    may be that folder). The annotation files are MD5-verified (and the image zip, when it has to be
    extracted); an image that fails to decode raises :class:`DatasetCorruptedError` naming it. CelebA has
    no class labels: ``labels`` are all 0. Splits: ``train``, ``valid``, ``test`` (the official partition).
    ``limit`` keeps the first ``limit`` images of each split (the full set is 202,599 images).
    """
    files = _celeba_files()
    root = Path(root)
    wanted = [splits] if isinstance(splits, str) else list(splits)
    bad = [s for s in wanted if s not in ("train", "valid", "test")]
    if bad or not wanted:
        raise ValueError(f"celeba: unknown split(s) {bad}; valid: ['train', 'valid', 'test']")
    folder = root if root.name == "celeba" and not (root / "celeba").is_dir() else root / "celeba"
    tv_root = folder.parent

    def missing() -> list[tuple[str, str]]:
        out = []
        for name, md5 in files:
            if name == "img_align_celeba.zip":
                if not (folder / "img_align_celeba").is_dir() and not (folder / name).is_file():
                    out.append((name, md5))
            elif not (folder / name).is_file():
                out.append((name, md5))
        return out

    if missing() and download:
        try:
            from torchvision.datasets import CelebA

            CelebA(str(tv_root), split="all", target_type=[], download=True)
        except Exception as e:
            raise DatasetNotFoundError(_celeba_missing_message(
                folder, missing(), f"download failed ({type(e).__name__}: {e})")) from e
    if missing():
        raise DatasetNotFoundError(_celeba_missing_message(folder, missing(), f"missing files under {folder}"))
    for name, md5 in files:
        if name == "img_align_celeba.zip":
            if not (folder / "img_align_celeba").is_dir():
                from torchvision.datasets.utils import extract_archive

                verify_md5(folder / name, md5)
                extract_archive(str(folder / name), str(folder))
        else:
            verify_md5(folder / name, md5)

    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import CelebA

    transform = transforms.Compose([transforms.CenterCrop(crop), transforms.Resize(size)])
    xs, counts = [], []
    for s in wanted:
        ds = CelebA(str(tv_root), split=s, target_type=[])
        names = list(ds.filename)[:limit]
        arr = np.empty((len(names), 3, size, size), dtype=np.uint8)
        for i, fname in enumerate(names):
            path = folder / "img_align_celeba" / fname
            try:
                with Image.open(path) as im:
                    img = transform(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DatasetCorruptedError(f"{fname} cannot be decoded ({e}); file: {path}") from e
            arr[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        xs.append(arr)
        counts.append(len(names))
    x = np.concatenate(xs)
    meta = {"splits": wanted, "files": {n: {"md5": m, "verified": True} for n, m in files},
            "crop": int(crop), "size": int(size), "limit": limit, "labels": "none (all 0)"}
    return RawDataset("celeba", x, np.zeros(len(x), dtype=np.int64), _split_array(wanted, counts), meta)


# ----------------------------------------------------------------------------------------------------
# Prepared data: Parquet I/O
# ----------------------------------------------------------------------------------------------------

_RESERVED_META = ("shape", "dataset", "kind")
_ROWS_PER_GROUP = 8192


@dataclass
class PreparedData:
    """Prepared data as tensors: ``x`` float32 — images in [0, 1] ``(B, C, H, W)`` or points ``(B, D)`` —,
    ``labels`` int64 ``(B,)``, ``meta`` (``dataset``, ``shape``, ``kind``, ``num_rows`` and the writer's
    meta), ``split`` the split name of each row."""

    x: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any]
    split: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def write_prepared(
    path: str | os.PathLike,
    images_or_points: Any,
    labels: Any,
    split: str | Sequence[str],
    dataset: str,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write prepared data to one Parquet file, atomically (temp file in the same folder + ``os.replace``).

    ``images_or_points``: uint8 ``(N, C, H, W)`` images (column ``image``, C·H·W bytes per row) or float
    ``(N, D)`` points (column ``x``, list<float32>); ``labels``: ``(N,)`` integers (column ``label``,
    int64); ``split``: one name for all rows or one per row (column ``split``). Schema metadata:
    ``scoresde.shape`` (JSON list), ``scoresde.dataset``, ``scoresde.kind`` (``image``/``points``) and
    ``scoresde.meta`` (``meta`` as JSON). Returns the path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    arr = _to_numpy(images_or_points)
    n = int(arr.shape[0]) if arr.ndim else 0
    if arr.ndim == 4:
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {arr.dtype} — convert with to_uint8")
        kind = "image"
    elif arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
        kind = "points"
        arr = arr.astype(np.float32, copy=False)
    else:
        raise ValueError(f"expected uint8 images (N, C, H, W) or float points (N, D), got {arr.dtype} "
                         f"{arr.shape}")
    shape = [int(s) for s in arr.shape[1:]]
    lab = _to_numpy(labels)
    if lab.shape != (n,) or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"labels must be integers of shape ({n},), got {lab.dtype} {lab.shape}")
    lab = lab.astype(np.int64)
    if isinstance(split, str):
        splits = np.full(n, split, dtype=object)
    else:
        splits = np.asarray([str(s) for s in split], dtype=object)
        if splits.shape != (n,):
            raise ValueError(f"split must be a string or {n} strings, got {splits.shape[0]}")
    meta = dict(meta or {})
    clash = [k for k in _RESERVED_META if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are reserved (written by write_prepared itself)")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from e

    data_field = pa.field("image", pa.binary()) if kind == "image" else pa.field("x", pa.list_(pa.float32()))
    schema = pa.schema([data_field, pa.field("label", pa.int64()), pa.field("split", pa.string())]).with_metadata({
        "scoresde.shape": json.dumps(shape),
        "scoresde.dataset": str(dataset),
        "scoresde.kind": kind,
        "scoresde.meta": meta_json,
    })
    row = int(np.prod(shape))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, max(n, 1), _ROWS_PER_GROUP):
                stop = min(start + _ROWS_PER_GROUP, n)
                m = stop - start
                flat = np.ascontiguousarray(arr[start:stop]).reshape(-1)
                offsets = pa.py_buffer((np.arange(m + 1, dtype=np.int32) * row).tobytes())
                if kind == "image":
                    col = pa.Array.from_buffers(pa.binary(), m, [None, offsets, pa.py_buffer(flat.tobytes())])
                else:
                    col = pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), m + 1, [None, offsets]),
                                                   pa.array(flat, type=pa.float32()))
                table = pa.Table.from_arrays(
                    [col, pa.array(lab[start:stop], type=pa.int64()),
                     pa.array(list(splits[start:stop]), type=pa.string())], schema=schema)
                writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; prepared data is shared by every later stage
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).schema_arrow.metadata or {}
    md = {k.decode(): v.decode() for k, v in md.items()}
    if "scoresde.shape" not in md or "scoresde.kind" not in md:
        raise ValueError(f"{path} is not a scoresde prepared-data file (no scoresde.* schema metadata)")
    meta = json.loads(md.get("scoresde.meta", "{}"))
    meta.update(dataset=md.get("scoresde.dataset"), shape=json.loads(md["scoresde.shape"]),
                kind=md["scoresde.kind"])
    return meta


def load_prepared(path: str | os.PathLike, split: str | None = None) -> PreparedData:
    """Read a file written by :func:`write_prepared` (optionally only the rows of ``split``).

    Images come back as float32 in [0, 1] (``uint8 / 255``), shape ``(B, C, H, W)``; points as float32
    ``(B, D)``. ``meta`` holds the writer's meta plus ``dataset``, ``shape``, ``kind`` and ``num_rows``.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared data not found: {path}")
    meta = _read_meta(path)
    shape = tuple(meta["shape"])
    table = pq.read_table(path)
    if split is not None:
        mask = pc.equal(table.column("split"), split)
        selected = table.filter(mask)
        if selected.num_rows == 0:
            present = sorted(set(table.column("split").to_pylist()))
            raise ValueError(f"{path}: no rows with split {split!r}; splits present: {present}")
        table = selected
    n = table.num_rows
    row = int(np.prod(shape))
    if meta["kind"] == "image":
        parts = []
        for chunk in table.column("image").chunks:
            if chunk.null_count:
                raise DatasetCorruptedError(f"{path}: null images")
            _, off_buf, data_buf = chunk.buffers()
            offsets = np.frombuffer(off_buf, dtype=np.int32)[chunk.offset: chunk.offset + len(chunk) + 1]
            if len(chunk) and not np.all(np.diff(offsets) == row):
                raise DatasetCorruptedError(f"{path}: image rows are not {row} bytes (shape {list(shape)})")
            parts.append(np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]] if len(chunk) else
                         np.empty(0, dtype=np.uint8))
        u8 = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
        x = torch.from_numpy(u8.reshape(n, *shape).astype(np.float32)) / 255.0
    else:
        col = table.column("x").combine_chunks()
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        if values.size != n * row:
            raise DatasetCorruptedError(f"{path}: point rows are not of length {row}")
        x = torch.from_numpy(values.reshape(n, *shape).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    meta["num_rows"] = n
    return PreparedData(x=x, labels=labels, meta=meta, split=table.column("split").to_pylist())


# ----------------------------------------------------------------------------------------------------
# Pixel space ↔ model space
# ----------------------------------------------------------------------------------------------------


def to_model_space(x01: torch.Tensor, centered: bool) -> torch.Tensor:
    """[0, 1] images → the model's space: unchanged (NCSN / VE) or ``2x − 1`` ∈ [−1, 1] when ``centered``
    (DDPM / VP / sub-VP, Ho et al., 2020)."""
    return x01 * 2.0 - 1.0 if centered else x01


def from_model_space(x: torch.Tensor, centered: bool) -> torch.Tensor:
    """Inverse of :func:`to_model_space`, clamped to [0, 1]."""
    x01 = (x + 1.0) / 2.0 if centered else x
    return x01.clamp(0.0, 1.0)


def to_uint8(x01: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """[0, 1] floats → uint8 ``round(255·x)`` (clamped first); a NumPy array gives a NumPy array."""
    if isinstance(x01, np.ndarray):
        return np.floor(np.clip(x01, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return torch.floor(x01.detach().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
