"""Modules on mtlcore's fused ops: :class:`Conv2dAct`, :func:`fuse`, :class:`MultiTaskLoss`,
the heads and :class:`MultiTaskModel`."""

from __future__ import annotations

from mtlcore.nn.conv import Conv2dAct, fuse
from mtlcore.nn.loss import MultiTaskLoss
from mtlcore.nn.model import DenseHead, GroupedModel, LinearHead, MLPHead, MultiTaskModel

__all__ = [
    "Conv2dAct",
    "DenseHead",
    "GroupedModel",
    "LinearHead",
    "MLPHead",
    "MultiTaskLoss",
    "MultiTaskModel",
    "fuse",
]
