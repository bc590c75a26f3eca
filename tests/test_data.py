"""scoresde.datasets + scoresde.image_datasets + scoresde.data: dataset registry, checksum-verified real-data loaders, Parquet prepared data."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from scoresde import data as D
from scoresde import datasets as DS
from scoresde import image_datasets as IDS

SHARED_MNIST = Path(os.environ.get("SCORESDE_MNIST_ROOT", Path(__file__).resolve().parents[2] / "shared/data/mnist"))
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # published class counts


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(DS.DATASETS) >= {"toy", "digits", "mnist", "cifar10", "celeba"}


def test_unknown_dataset_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        DS.get_dataset("imagenet")
    msg = str(e.value)
    assert "imagenet" in msg
    for name in ("toy", "digits", "mnist", "cifar10", "celeba"):
        assert name in msg


def test_unknown_option_names_the_key():
    with pytest.raises(ValueError, match="bogus"):
        DS.get_dataset("digits", bogus=1)


# ------------------------------------------------------------------------------------------------
# toy
# ------------------------------------------------------------------------------------------------


class _FakeMixture:
    """Stand-in with scoresde.toy.GaussianMixture's interface, to test the wiring on its own."""

    def __init__(self, weights, means, std):
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.std = float(std)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.means.shape[1], generator=generator,
                                                      dtype=torch.float64)


def test_toy_uses_scoresde_toy_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "scoresde.toy", types.SimpleNamespace(GaussianMixture=_FakeMixture))
    ds = DS.get_dataset("toy", n=4000, n_test=500, seed=3)
    assert ds.x.shape == (4500, 2) and ds.x.dtype == np.float32
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) <= {0, 1}
    assert (ds.split == "train").sum() == 4000 and (ds.split == "test").sum() == 500
    frac0 = (ds.labels == 0).mean()
    assert abs(frac0 - 0.8) < 0.03
    # labels are the component: points of component 0 sit around (5, 5)
    assert np.allclose(ds.x[ds.labels == 0].mean(0), [5, 5], atol=0.1)
    assert np.allclose(ds.x[ds.labels == 1].mean(0), [-5, -5], atol=0.2)
    again = DS.get_dataset("toy", n=4000, n_test=500, seed=3)
    assert np.array_equal(ds.x, again.x)  # seeded generator -> identical draws
    other = DS.get_dataset("toy", n=4000, n_test=500, seed=4)
    assert not np.array_equal(ds.x, other.x)
    assert ds.meta["weights"] == [0.8, 0.2] and ds.meta["means"] == [[5.0, 5.0], [-5.0, -5.0]]


def test_toy_with_real_gaussian_mixture():
    pytest.importorskip("scoresde.toy")
    ds = DS.get_dataset("toy", n=2000, seed=0)
    assert ds.x.shape == (2000, 2) and ds.x.dtype == np.float32
    assert abs((ds.labels == 0).mean() - 0.8) < 0.04
    assert np.allclose(ds.x[ds.labels == 0].mean(0), [5, 5], atol=0.1)
    assert np.allclose(ds.x[ds.labels == 1].mean(0), [-5, -5], atol=0.2)
    assert np.array_equal(ds.x, DS.get_dataset("toy", n=2000, seed=0).x)


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return DS.get_dataset("digits")


def test_digits_count_and_range(digits):
    assert len(digits) == 1797
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.uint8
    assert digits.x.min() == 0 and digits.x.max() == 255
    allowed = {int(np.floor(v * 255 / 16 + 0.5)) for v in range(17)}
    assert set(np.unique(digits.x).tolist()) <= allowed
    assert digits.labels.dtype == np.int64 and set(np.unique(digits.labels)) == set(range(10))
    assert (digits.split == "train").sum() == 1500 and (digits.split == "test").sum() == 297
    assert list(digits.split[-297:]) == ["test"] * 297  # deterministic: the last 297


def test_digits_match_sklearn(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().images
    assert np.array_equal(digits.x[:, 0], np.round(raw * 255 / 16).astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# Parquet prepared data
# ------------------------------------------------------------------------------------------------


def test_parquet_roundtrip_digits(tmp_path, digits):
    path = D.write_prepared(tmp_path / "prep" / "data.parquet", digits.x, digits.labels, digits.split,
                            "digits", {"source": "sklearn", "seed": 0})
    schema = pq.read_schema(path)
    assert schema.field("image").type == "binary"
    assert schema.field("label").type == "int64" and schema.field("split").type == "string"
    md = schema.metadata
    assert md[b"scoresde.shape"] == b"[1, 8, 8]" and md[b"scoresde.dataset"] == b"digits"

    prep = D.load_prepared(path)
    assert isinstance(prep, D.PreparedData)
    assert prep.x.dtype == torch.float32 and prep.x.shape == (1797, 1, 8, 8)
    assert 0.0 <= prep.x.min() and prep.x.max() <= 1.0
    assert torch.equal(D.to_uint8(prep.x), torch.from_numpy(digits.x))  # lossless
    assert prep.labels.dtype == torch.int64 and torch.equal(prep.labels, torch.from_numpy(digits.labels))
    assert prep.meta["dataset"] == "digits" and prep.meta["shape"] == [1, 8, 8]
    assert prep.meta["kind"] == "image" and prep.meta["source"] == "sklearn" and prep.meta["seed"] == 0
    test = D.load_prepared(path, split="test")
    assert test.x.shape[0] == 297 and set(test.split) == {"test"}
    assert torch.equal(test.x, prep.x[-297:])
    with pytest.raises(ValueError, match="valid"):
        D.load_prepared(path, split="valid")
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.parquet"]  # no temp files left


def test_parquet_roundtrip_toy_points(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pts = torch.randn(1000, 2, generator=gen) * 3
    labels = (pts[:, 0] > 0).long()
    split = ["train"] * 900 + ["test"] * 100
    path = D.write_prepared(tmp_path / "toy.parquet", pts, labels, split, "toy", {"std": 1.0})
    schema = pq.read_schema(path)
    assert pa.types.is_list(schema.field("x").type) and schema.field("x").type.value_type == pa.float32()
    prep = D.load_prepared(path)
    assert prep.x.dtype == torch.float32 and prep.x.shape == (1000, 2)
    assert torch.equal(prep.x, pts)  # float32 stored exactly
    assert torch.equal(prep.labels, labels)
    assert prep.meta == {"std": 1.0, "dataset": "toy", "shape": [2], "kind": "points", "num_rows": 1000}
    assert D.load_prepared(path, split="test").x.shape == (100, 2)


def test_parquet_roundtrip_toy_dataset(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scoresde.toy", types.SimpleNamespace(GaussianMixture=_FakeMixture))
    ds = DS.get_dataset("toy", n=300, seed=1)
    prep = D.load_prepared(ds.write(tmp_path / "toy.parquet"))
    assert torch.equal(prep.x, torch.from_numpy(ds.x)) and prep.meta["seed"] == 1


def test_write_prepared_is_atomic(tmp_path, monkeypatch, digits):
    path = tmp_path / "data.parquet"
    D.write_prepared(path, digits.x[:10], digits.labels[:10], "train", "digits")
    before = path.read_bytes()

    def boom(self, table, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        D.write_prepared(path, digits.x, digits.labels, digits.split, "digits")
    assert path.read_bytes() == before  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["data.parquet"]  # temp file removed


def test_write_prepared_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        D.write_prepared(tmp_path / "a.parquet", np.zeros((2, 1, 8, 8), np.float32), [0, 1], "train", "x")
    with pytest.raises(ValueError, match="labels"):
        D.write_prepared(tmp_path / "a.parquet", np.zeros((2, 2), np.float32), [0], "train", "x")
    with pytest.raises(ValueError, match="reserved"):
        D.write_prepared(tmp_path / "a.parquet", np.zeros((2, 2), np.float32), [0, 1], "train", "x",
                         {"shape": [3]})
    assert not list(tmp_path.iterdir())


def test_model_space():
    x01 = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(D.to_model_space(x01, centered=False), x01)
    assert torch.allclose(D.to_model_space(x01, centered=True), torch.tensor([-1.0, -0.5, 1.0]))
    assert torch.allclose(D.from_model_space(D.to_model_space(x01, True), True), x01)
    assert torch.equal(D.from_model_space(torch.tensor([-3.0, 0.5, 2.0]), centered=True),
                       torch.tensor([0.0, 0.75, 1.0]))
    assert torch.equal(D.from_model_space(torch.tensor([-0.1, 1.2]), centered=False), torch.tensor([0.0, 1.0]))
    u8 = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(D.to_uint8(u8.float() / 255), u8)
    assert D.to_uint8(np.array([0.0, 0.5, 2.0])).tolist() == [0, 128, 255]


# ------------------------------------------------------------------------------------------------
# MNIST: IDX files, checksums, missing files
# ------------------------------------------------------------------------------------------------


def test_mnist_md5s_match_torchvision():
    from torchvision.datasets import MNIST

    assert {name: info["md5"] for name, info in IDS.MNIST_FILES.items()} == dict(MNIST.resources)


def _write_idx_gz(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_read_idx_synthetic(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx_gz(tmp_path / "a-idx3-ubyte.gz", arr)
    assert np.array_equal(IDS.read_idx(tmp_path / "a-idx3-ubyte.gz"), arr)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") * 3 + b"xx"))
    with pytest.raises(DS.DatasetCorruptedError, match="bad.gz"):
        IDS.read_idx(tmp_path / "bad.gz")


needs_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file()
    or not (SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason=f"MNIST test files not present in {SHARED_MNIST}",
)


@pytest.fixture(scope="module")
def mnist_test():
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not present in {SHARED_MNIST}")
    return DS.get_dataset("mnist", root=SHARED_MNIST, splits=("test",))


@needs_mnist
def test_mnist_real_test_split(mnist_test):
    ds = mnist_test
    assert ds.x.shape == (10000, 1, 28, 28) and ds.x.dtype == np.uint8
    assert ds.labels.dtype == np.int64
    hist = np.bincount(ds.labels, minlength=10)
    assert hist.sum() == 10000 and hist.tolist() == MNIST_TEST_HISTOGRAM
    assert set(ds.split) == {"test"}
    assert ds.x.max() == 255 and ds.x.min() == 0
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert ds.meta["files"][name] == {"md5": IDS.MNIST_FILES[name]["md5"], "verified": True}
        assert _md5(SHARED_MNIST / name) == IDS.MNIST_FILES[name]["md5"]


@needs_mnist
def test_mnist_idx_parser_agrees_with_torchvision(tmp_path, mnist_test):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    ours = {}
    for name, reader in (("t10k-images-idx3-ubyte", read_image_file), ("t10k-labels-idx1-ubyte", read_label_file)):
        raw = tmp_path / name
        raw.write_bytes(gzip.decompress((SHARED_MNIST / f"{name}.gz").read_bytes()))
        ours[name] = IDS.read_idx(raw)
        assert np.array_equal(ours[name], reader(str(raw)).numpy())
    assert np.array_equal(mnist_test.x[:, 0], ours["t10k-images-idx3-ubyte"])
    assert np.array_equal(mnist_test.labels, ours["t10k-labels-idx1-ubyte"])


@needs_mnist
def test_mnist_missing_train_images_is_a_clear_error():
    with pytest.raises(DS.DatasetNotFoundError) as e:
        DS.get_dataset("mnist", root=SHARED_MNIST)  # default splits include train; train images are absent
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    assert str(SHARED_MNIST.resolve()) in msg and "test" in msg  # says where, and what is complete
    avail = DS.get_dataset("mnist", root=SHARED_MNIST, splits="available")
    assert set(avail.split) == {"test"} and len(avail) == 10000


@needs_mnist
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_mnist_corrupted_file_is_named(tmp_path, damage):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(SHARED_MNIST / name, tmp_path / name)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DS.DatasetCorruptedError) as e:
        DS.get_dataset("mnist", root=tmp_path, splits=("test",))
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and "9fb629c4189551a2d022fa330f9573f3" in msg
    if damage == "truncate":
        # even without the checksum, the IDX length check refuses the truncated file
        with pytest.raises(DS.DatasetCorruptedError, match="t10k-images-idx3-ubyte.gz"):
            DS.get_dataset("mnist", root=tmp_path, splits=("test",), verify=False)


@needs_mnist
def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.symlink(SHARED_MNIST / name, raw / name)
    ds = DS.get_dataset("mnist", root=tmp_path, splits="test", limit=100)
    assert ds.x.shape == (100, 1, 28, 28)


def test_missing_dataset_root_lists_expected_files(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DS.DatasetNotFoundError) as e:
        DS.get_dataset("mnist", root=root)
    msg = str(e.value)
    for name, info in IDS.MNIST_FILES.items():
        assert name in msg and info["md5"] in msg
    assert str(root.resolve()) in msg and "download=True" in msg
    assert isinstance(e.value, FileNotFoundError)

    with pytest.raises(DS.DatasetNotFoundError) as e:
        DS.get_dataset("cifar10", root=root)
    msg = str(e.value)
    for name in ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "data_batch_1", "test_batch",
                 "batches.meta"):
        assert name in msg

    with pytest.raises(DS.DatasetNotFoundError) as e:
        DS.get_dataset("celeba", root=root)
    msg = str(e.value)
    for name in ("img_align_celeba", "list_eval_partition.txt", "d32c9cbf5e040fd4025c592c306e6668"):
        assert name in msg
    assert str((root / "celeba").resolve()) in msg


# ------------------------------------------------------------------------------------------------
# CIFAR-10 and CelebA through torchvision, on small fakes whose checksums are patched in
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": _md5(folder / "batches.meta")})
    return tmp_path


def test_cifar10_through_torchvision(fake_cifar):
    ds = DS.get_dataset("cifar10", root=fake_cifar)
    assert ds.x.shape == (24, 3, 32, 32) and ds.x.dtype == np.uint8
    assert (ds.split == "train").sum() == 20 and (ds.split == "test").sum() == 4
    first = pickle.loads((fake_cifar / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert np.array_equal(ds.x[0].reshape(-1), first["data"][0])  # CHW order preserved
    assert ds.meta["classes"][0] == "c0"


def test_cifar10_corrupted_batch_is_named_and_never_unpickled(fake_cifar, monkeypatch):
    (fake_cifar / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unverified file was unpickled"))
    with pytest.raises(DS.DatasetCorruptedError, match="data_batch_3"):
        DS.get_dataset("cifar10", root=fake_cifar)


@pytest.fixture
def fake_celeba(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision.datasets import CelebA

    folder = tmp_path / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, 7)]
    parts = [0, 0, 0, 1, 2, 2]
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(folder / "img_align_celeba" / name)
    rows = lambda vals: "".join(f"{n} {v}\n" for n, v in zip(names, vals))  # noqa: E731
    (folder / "list_eval_partition.txt").write_text(rows(parts))
    (folder / "identity_CelebA.txt").write_text(rows(range(6)))
    (folder / "list_bbox_celeba.txt").write_text("6\nimage_id x_1 y_1 width height\n" + rows(["1 2 3 4"] * 6))
    (folder / "list_landmarks_align_celeba.txt").write_text("6\nlefteye_x lefteye_y\n" + rows(["1 2"] * 6))
    (folder / "list_attr_celeba.txt").write_text("6\nSmiling Young\n" + rows(["1 -1"] * 6))
    file_list = [(fid, md5, name) for fid, md5, name in CelebA.file_list]
    file_list = [(fid, md5 if name.endswith(".zip") else _md5(folder / name), name) for fid, md5, name in file_list]
    monkeypatch.setattr(CelebA, "file_list", file_list)
    return tmp_path


def test_celeba_center_crop_resize(fake_celeba):
    from PIL import Image

    ds = DS.get_dataset("celeba", root=fake_celeba)
    assert ds.x.shape == (5, 3, 64, 64) and ds.x.dtype == np.uint8
    assert ds.split.tolist() == ["train"] * 3 + ["test"] * 2
    assert (ds.labels == 0).all()
    with Image.open(fake_celeba / "celeba" / "img_align_celeba" / "000001.jpg") as im:
        w, h = im.size
        ref = im.convert("RGB").crop(((w - 140) // 2, (h - 140) // 2, (w - 140) // 2 + 140, (h - 140) // 2 + 140))
        ref = np.asarray(ref.resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1).astype(int)
    assert np.abs(ds.x[0].astype(int) - ref).mean() < 3  # the NCSN crop 140 -> 64


def test_celeba_corrupted_annotation_and_image_are_named(fake_celeba):
    img = fake_celeba / "celeba" / "img_align_celeba" / "000002.jpg"
    img.write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DS.DatasetCorruptedError, match="000002.jpg"):
        DS.get_dataset("celeba", root=fake_celeba, splits=("train",))
    with open(fake_celeba / "celeba" / "list_eval_partition.txt", "a") as f:
        f.write("000007.jpg 0\n")
    with pytest.raises(DS.DatasetCorruptedError, match="list_eval_partition.txt"):
        DS.get_dataset("celeba", root=fake_celeba)
