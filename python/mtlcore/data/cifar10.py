"""CIFAR10MultiTask: CIFAR-10 as a two-task set, read from the standard python batches.

``root`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (the folder
``cifar-10-batches-py`` of the official archive). Tasks: ``class`` (ce, 10 classes) and
``animal`` (bce: 1 for the six animal classes, 0 for airplane, automobile, ship and truck).
Nothing is downloaded. The batches are pickles, as the official archive ships them: read only
files you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlcore.tasks import Task

__all__ = ["CIFAR10MultiTask"]

_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = ["test_batch"]
VEHICLES = (0, 1, 8, 9)  # airplane, automobile, ship, truck
_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} does not exist")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (no data/labels entries)")
    data = torch.as_tensor(batch[b"data"])
    labels = torch.as_tensor(list(batch[b"labels"]), dtype=torch.long)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: data must be uint8 rows of 3072 values, got {data.dtype} {tuple(data.shape)}"
        )
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"{path}: labels must be in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR10MultiTask(Dataset):
    """See the module docstring. ``dataset[i]`` is ``(image [3, 32, 32], {"class", "animal"})``."""

    def __init__(self, root: str | os.PathLike, split: str = "train") -> None:
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR10MultiTask: split must be 'train' or 'test', got {split!r}")
        parts = [_read_batch(Path(root) / name) for name in (_TRAIN if split == "train" else _TEST)]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_STD).view(1, 3, 1, 1)
        self.images = ((images.float() / 255 - mean) / std).contiguous()
        vehicle = torch.isin(labels, torch.tensor(VEHICLES))
        self.targets = {"class": labels, "animal": (~vehicle).float()[:, None]}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], {k: v[i] for k, v in self.targets.items()}

    @staticmethod
    def tasks() -> list[Task]:
        return [Task("class", "ce", 10), Task("animal", "bce", 1)]
