"""Training: :class:`Trainer` and atomic checkpoints."""

from __future__ import annotations

from mtlcore.train.checkpoint import load_checkpoint, save_checkpoint
from mtlcore.train.trainer import Trainer

__all__ = ["Trainer", "load_checkpoint", "save_checkpoint"]
