"""Modules on mtlcore's fused ops: :class:`Conv2dAct`, :func:`fuse`, :class:`MaxPool2d`,
:class:`MultiTaskLoss`, the heads and :class:`MultiTaskModel`."""

from __future__ import annotations

from mtlcore.nn.conv import Conv2dAct, fuse
from mtlcore.nn.loss import MultiTaskLoss
from mtlcore.nn.model import DenseHead, GroupedModel, LinearHead, MLPHead, MultiTaskModel
from mtlcore.nn.pool import MaxPool2d

__all__ = [
    "Conv2dAct",
    "DenseHead",
    "GroupedModel",
    "LinearHead",
    "MLPHead",
    "MaxPool2d",
    "MultiTaskLoss",
    "MultiTaskModel",
    "fuse",
]
