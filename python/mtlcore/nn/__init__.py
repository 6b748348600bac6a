"""Modules on mtlcore's fused ops: :class:`Conv2dAct`, :func:`fuse` and :class:`MultiTaskLoss`."""

from __future__ import annotations

from mtlcore.nn.conv import Conv2dAct, fuse
from mtlcore.nn.loss import MultiTaskLoss

__all__ = ["Conv2dAct", "MultiTaskLoss", "fuse"]
