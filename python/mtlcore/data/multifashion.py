"""MultiFashion: the multi-task benchmark of Lin et al. 2019 (Pareto MTL), from Fashion-MNIST.

Each sample is a 1 x 36 x 36 image holding two Fashion-MNIST items: one at the top-left
(rows and columns 0-27) and one at the bottom-right (8-35), overlaid with a pixel-wise max.
Tasks: ``left`` (ce, 10 classes) and ``right`` (ce, 10 classes). The training split pairs
images of the Fashion-MNIST training files, the test split those of the t10k files; the pairs
are drawn from ``seed``, so the same seed always gives the same set.

The four gzipped IDX files are read from ``data_dir``, else ``$MTLCORE_DATA``, else the folder
of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlcore.data.idx import read_idx
from mtlcore.tasks import Task

__all__ = ["DEBIAN_FASHION_MNIST", "MultiFashion", "find_fashion_mnist"]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CANVAS = 36
SHIFT = CANVAS - 28


def find_fashion_mnist(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST files: ``data_dir``, ``$MTLCORE_DATA`` or the
    Debian package's folder, the first that has them; None when none has."""
    candidates = [data_dir, os.environ.get("MTLCORE_DATA"), DEBIAN_FASHION_MNIST]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for files in _FILES.values() for f in files):
            return Path(c)
    return None


class MultiFashion(Dataset):
    """See the module docstring. ``dataset[i]`` is ``(image [1, 36, 36], {"left", "right"})``."""

    def __init__(
        self,
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        if split not in _FILES:
            raise ValueError(f"MultiFashion: split must be 'train' or 'test', got {split!r}")
        folder = find_fashion_mnist(data_dir)
        if folder is None:
            raise FileNotFoundError(
                "MultiFashion: Fashion-MNIST not found in --data-dir, $MTLCORE_DATA or "
                f"{DEBIAN_FASHION_MNIST} (Debian package dataset-fashion-mnist)"
            )
        images_file, labels_file = (folder / f for f in _FILES[split])
        images = read_idx(images_file, expected_ndim=3)
        labels = read_idx(labels_file, expected_ndim=1)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{images_file}: expected 28x28 images, got {tuple(images.shape[1:])}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{images_file} holds {images.shape[0]} images but {labels_file} "
                f"{labels.shape[0]} labels"
            )
        if labels.numel() and int(labels.max()) > 9:
            raise ValueError(f"{labels_file}: labels must be in [0, 9], got {int(labels.max())}")
        n = images.shape[0] if num_samples is None else min(int(num_samples), images.shape[0])
        g = torch.Generator().manual_seed(int(seed) * 2 + (split == "test"))
        left = torch.randperm(images.shape[0], generator=g)[:n]
        right = torch.randperm(images.shape[0], generator=g)[:n]
        canvas = torch.zeros(n, CANVAS, CANVAS, dtype=torch.uint8)
        canvas[:, :28, :28] = images[left]
        canvas[:, SHIFT:, SHIFT:] = torch.maximum(canvas[:, SHIFT:, SHIFT:], images[right])
        # Scaled to [0, 1], then centred with Fashion-MNIST's usual mean and std.
        self.images = ((canvas.float() / 255 - 0.2860) / 0.3530).unsqueeze(1).contiguous()
        self.targets = {"left": labels[left].long(), "right": labels[right].long()}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], {k: v[i] for k, v in self.targets.items()}

    @staticmethod
    def tasks() -> list[Task]:
        return [Task("left", "ce", 10), Task("right", "ce", 10)]
