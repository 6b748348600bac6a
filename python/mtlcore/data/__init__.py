"""Multi-task datasets. Nothing here downloads: data is generated (:class:`Shapes`) or read
from local files."""

from __future__ import annotations

from mtlcore.data.cifar10 import CIFAR10MultiTask
from mtlcore.data.idx import read_idx
from mtlcore.data.multifashion import MultiFashion, find_fashion_mnist
from mtlcore.data.shapes import Shapes

__all__ = ["CIFAR10MultiTask", "MultiFashion", "Shapes", "find_fashion_mnist", "read_idx"]
