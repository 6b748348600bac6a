"""The Shapes synthetic multi-task set: deterministic, labels consistent with the images."""

from __future__ import annotations

import gzip
import math
import pickle
import struct

import pytest
import torch
from torch.utils.data import DataLoader

from mtlcore.data import CIFAR10MultiTask, MultiFashion, Shapes, find_fashion_mnist, read_idx


def test_shapes_is_deterministic_and_splits_differ():
    a, b = Shapes(64, seed=3), Shapes(64, seed=3)
    assert torch.equal(a.images, b.images)
    for k in a.targets:
        assert torch.equal(a.targets[k], b.targets[k])
    test = Shapes(64, split="test", seed=3)
    assert not torch.equal(a.images, test.images)
    assert not torch.equal(a.images, Shapes(64, seed=4).images)


def test_shapes_labels_describe_the_images():
    data = Shapes(200, seed=0)
    n, s = len(data), data.image_size
    assert data.images.shape == (n, 3, s, s)
    t = data.targets
    assert t["shape"].shape == (n,) and int(t["shape"].max()) <= 2
    assert t["colour"].shape == (n,) and int(t["colour"].max()) <= 3
    assert t["size"].shape == (n, 1) and t["position"].shape == (n, 2)
    assert t["outline"].shape == (n, 1) and set(t["outline"].unique().tolist()) <= {0.0, 1.0}
    assert t["mask"].shape == (n, s, s)
    # The mask's class is the shape's, and its area grows with the size.
    for i in range(n):
        classes = t["mask"][i].unique().tolist()
        assert classes == [0, int(t["shape"][i]) + 1]
    area = (t["mask"] > 0).flatten(1).sum(1).float()
    radius = t["size"][:, 0] * s
    circles = t["shape"] == 0
    ratio = area[circles] / (math.pi * radius[circles] ** 2)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.1)
    # The shape's centre of mass is its position.
    _ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    inside = (t["mask"] > 0).float()
    cx = (inside * xs).flatten(1).sum(1) / area
    assert torch.allclose(cx[circles] / s, t["position"][circles, 0], atol=0.03)


def test_shapes_missing_labels_and_tasks():
    data = Shapes(500, seed=1, missing=0.3)
    assert 0.2 < (data.targets["shape"] == -100).float().mean() < 0.4
    assert 0.2 < torch.isnan(data.targets["size"]).float().mean() < 0.4
    missing_masks = (data.targets["mask"] == -100).flatten(1).all(1)
    assert 0.2 < missing_masks.float().mean() < 0.4
    tasks = {t.name: t for t in data.tasks()}
    assert set(tasks) == set(data.targets)
    assert tasks["mask"].dense and tasks["mask"].num_outputs == 4
    image, target = next(iter(DataLoader(data, batch_size=8)))
    assert image.shape == (8, 3, 32, 32) and target["mask"].shape == (8, 32, 32)
    with pytest.raises(ValueError, match="split"):
        Shapes(4, split="val")


# ------------------------------------------------------------------------------------------
# IDX files and MultiFashion (small files written here in the real formats)
# ------------------------------------------------------------------------------------------


def write_idx(path, data: torch.Tensor, magic_ndim=None, truncate=0):
    header = struct.pack(">HBB", 0, 8, data.dim() if magic_ndim is None else magic_ndim)
    header += struct.pack(f">{data.dim()}I", *data.shape)
    raw = header + data.to(torch.uint8).numpy().tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate])


def fake_fashion_mnist(folder, n_train=30, n_test=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz", torch.randint(256, (n, 28, 28), generator=g)
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(10, (n,), generator=g))
    return folder


def test_multifashion_composes_two_items(tmp_path):
    folder = fake_fashion_mnist(tmp_path)
    images = read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz")
    data = MultiFashion("train", folder, seed=5)
    again = MultiFashion("train", folder, seed=5)
    assert len(data) == 30 and data.images.shape == (30, 1, 36, 36)
    assert torch.equal(data.images, again.images)
    assert not torch.equal(data.images, MultiFashion("train", folder, seed=6).images)
    raw = data.images[:, 0] * 0.3530 + 0.2860  # undo the normalisation
    for i in range(len(data)):
        # Rows 0-7 hold only the left item; the right item's last rows only the right one.
        left = (raw[i, :8, :28] * 255).round().to(torch.uint8)
        match = (images[:, :8, :] == left).flatten(1).all(1).nonzero().flatten().tolist()
        assert int(data.targets["left"][i]) in [int(labels[j]) for j in match]
        right = (raw[i, 28:, 8:] * 255).round().to(torch.uint8)
        match = (images[:, 20:, :] == right).flatten(1).all(1).nonzero().flatten().tolist()
        assert int(data.targets["right"][i]) in [int(labels[j]) for j in match]
    assert len(MultiFashion("test", folder)) == 12
    assert [t.name for t in MultiFashion.tasks()] == ["left", "right"]


def test_fashion_mnist_folder_resolution(tmp_path, monkeypatch):
    (tmp_path / "fm").mkdir()
    folder = fake_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv("MTLCORE_DATA", str(folder))
    assert find_fashion_mnist(None) == folder
    assert len(MultiFashion("test", num_samples=5)) == 5
    monkeypatch.setenv("MTLCORE_DATA", str(tmp_path / "empty"))
    if find_fashion_mnist(None) is None:
        with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
            MultiFashion("train")


@pytest.mark.parametrize(
    ("problem", "match"),
    [
        ("truncated", "header announces"),
        ("magic", "expected 3 dimensions"),
        ("count", "holds 30 images but"),
        ("gzip", "cannot read"),
    ],
)
def test_bad_idx_files_name_the_file(tmp_path, problem, match):
    folder = fake_fashion_mnist(tmp_path)
    images = folder / "train-images-idx3-ubyte.gz"
    if problem == "truncated":
        write_idx(images, torch.zeros(30, 28, 28), truncate=100)
    elif problem == "magic":
        write_idx(images, torch.zeros(30, 28, 28), magic_ndim=2)
    elif problem == "count":
        write_idx(folder / "train-labels-idx1-ubyte.gz", torch.zeros(29))
    else:
        images.write_bytes(images.read_bytes()[:50])
    with pytest.raises(ValueError, match=match) as info:
        MultiFashion("train", folder)
    assert "idx" in str(info.value)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST files not installed")
def test_real_multifashion():
    data = MultiFashion("test", num_samples=500)
    assert data.images.shape == (500, 1, 36, 36)
    for t in data.targets.values():
        assert 0 <= int(t.min()) and int(t.max()) <= 9 and len(t.unique()) == 10


# ------------------------------------------------------------------------------------------
# CIFAR-10 python batches (small ones written here in the real format)
# ------------------------------------------------------------------------------------------


def fake_cifar(folder, per_batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": torch.randint(256, (per_batch, 3072), generator=g).to(torch.uint8).numpy(),
            b"labels": torch.randint(10, (per_batch,), generator=g).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_multitask_reads_batches(tmp_path):
    folder = fake_cifar(tmp_path)
    train, test = CIFAR10MultiTask(folder), CIFAR10MultiTask(folder, "test")
    assert len(train) == 30 and len(test) == 6
    image, target = train[7]
    assert image.shape == (3, 32, 32) and target["animal"].shape == (1,)
    with open(folder / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert int(target["class"]) == raw[b"labels"][1]
    assert float(target["animal"]) == float(raw[b"labels"][1] not in (0, 1, 8, 9))
    first_pixel = (image[0, 0, 0] * 0.2470 + 0.4914) * 255
    assert float(first_pixel) == pytest.approx(raw[b"data"][1][0], abs=1e-3)
    assert [t.kind for t in CIFAR10MultiTask.tasks()] == ["ce", "bce"]


@pytest.mark.parametrize(
    ("problem", "match"),
    [
        ("missing", "does not exist"),
        ("garbage", "not a CIFAR-10 python batch"),
        ("shape", "rows of 3072"),
        ("labels", r"labels must be in \[0, 9\]"),
    ],
)
def test_cifar10_bad_batches_name_the_file(tmp_path, problem, match):
    folder = fake_cifar(tmp_path)
    path = folder / "data_batch_3"
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_bytes(b"not a pickle")
    else:
        data = torch.zeros(4, 3072 if problem == "labels" else 100, dtype=torch.uint8).numpy()
        labels = [0, 1, 12, 3] if problem == "labels" else [0, 1, 2, 3]
        with open(path, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        CIFAR10MultiTask(folder)
    assert "data_batch_3" in str(info.value)
