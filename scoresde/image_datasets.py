"""The file-based image datasets of the registry: MNIST (IDX files), CIFAR-10 and CelebA (torchvision).

- ``mnist``: the IDX files (LeCun et al.), read split by split, each file MD5-verified against the
  publisher's checksum before it is parsed.
- ``cifar10``: the python batches through ``torchvision.datasets.CIFAR10`` (MD5-verified first; the
  batches are pickles, so an unverified file is never unpickled).
- ``celeba``: aligned CelebA through ``torchvision.datasets.CelebA``, centre-cropped to 140 and resized
  to 64 as NCSN does (Song & Ermon, 2019, App. B.1).

Each loader registers itself in :data:`scoresde.datasets.DATASETS` (which imports this module), so
load them by name with :func:`scoresde.datasets.get_dataset`. Errors, checksums and :class:`RawDataset`
are those of :mod:`scoresde.datasets`.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scoresde.datasets import (
    DEFAULT_ROOT,
    DatasetCorruptedError,
    DatasetNotFoundError,
    RawDataset,
    _split_array,
    register_dataset,
    verify_md5,
)

__all__ = [
    "load_mnist",
    "load_cifar10",
    "load_celeba",
    "read_idx",
    "MNIST_FILES",
]


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
