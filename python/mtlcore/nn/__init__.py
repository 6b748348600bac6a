"""Modules on mtlcore's fused ops: :class:`Conv2dAct` and :func:`fuse`."""

from __future__ import annotations

from mtlcore.nn.conv import Conv2dAct, fuse

__all__ = ["Conv2dAct", "fuse"]
