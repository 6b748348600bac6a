"""Multi-task datasets. Nothing here downloads: data is generated (:class:`Shapes`) or read
from local files."""

from __future__ import annotations

from mtlcore.data.shapes import Shapes

__all__ = ["Shapes"]
