"""Shapes: a synthetic multi-task image set, generated deterministically from a seed.

Each sample is a ``3 x S x S`` image (default 32) of one shape on a noisy background, with six
tasks:

=========  ======  =======================================================================
task       kind    target
=========  ======  =======================================================================
shape      ce (3)  circle, square, triangle
colour     ce (4)  red, green, blue, yellow
size       mse     the shape's radius / S, ``[N, 1]``
position   mse     the shape's centre (x, y) / S, ``[N, 2]``
outline    bce     1 when a white outline is drawn around the shape, ``[N, 1]``
mask       ce (4)  per pixel: 0 background, 1 + the shape class inside the shape, ``[N, S, S]``
=========  ======  =======================================================================

The same (seed, split, size) always gives the same tensors, on any machine: everything is drawn
from one ``torch.Generator`` on the CPU. ``missing`` removes that share of the labels at random
(per sample and task: ``ignore_index`` for ce, NaN otherwise), to train with incomplete labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtlcore.tasks import Task

__all__ = ["Shapes"]

SHAPES = ("circle", "square", "triangle")
COLOURS = ((0.9, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.2, 0.9), (0.9, 0.85, 0.1))
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}


def _inside(shape: Tensor, cx: Tensor, cy: Tensor, r: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """[N, S, S] masks of each sample's shape of radius r centred at (cx, cy)."""
    cx, cy, r = (v[:, None, None] for v in (cx, cy, r))
    dx, dy = x - cx, y - cy
    circle = dx.square() + dy.square() <= r.square()
    half = 0.85 * r
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # Apex up at (cx, cy - r), base at y = cy + r with half-width r.
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) / 2)
    kind = shape[:, None, None]
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


class Shapes(Dataset):
    """See the module docstring. ``dataset[i]`` is ``(image, {task: target})``."""

    def __init__(
        self,
        num_samples: int = 10_000,
        split: str = "train",
        seed: int = 0,
        image_size: int = 32,
        missing: float = 0.0,
        ignore_index: int = -100,
    ) -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"Shapes: split must be 'train' or 'test', got {split!r}")
        if num_samples < 0 or image_size < 8:
            raise ValueError("Shapes: num_samples must be >= 0 and image_size >= 8")
        if not 0.0 <= missing < 1.0:
            raise ValueError(f"Shapes: missing must be in [0, 1), got {missing}")
        self.image_size = image_size
        self.ignore_index = ignore_index
        g = torch.Generator().manual_seed(int(seed) * 7919 + _SPLIT_OFFSET[split])
        n, s = num_samples, image_size
        shape = torch.randint(len(SHAPES), (n,), generator=g)
        colour = torch.randint(len(COLOURS), (n,), generator=g)
        r = s * (0.12 + 0.18 * torch.rand(n, generator=g))
        cx = r + (s - 2 * r) * torch.rand(n, generator=g)
        cy = r + (s - 2 * r) * torch.rand(n, generator=g)
        outline = torch.rand(n, generator=g) < 0.5

        coords = torch.arange(s, dtype=torch.float32) + 0.5
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        inside = _inside(shape, cx, cy, r, x, y)
        inner = _inside(shape, cx, cy, (r - 1.5).clamp(min=0.5), x, y)
        ring = inside & ~inner & outline[:, None, None]

        image = 0.25 + 0.1 * torch.randn(n, 3, s, s, generator=g)
        rgb = torch.tensor(COLOURS)[colour][:, :, None, None]  # [N, 3, 1, 1]
        image = torch.where(inside[:, None], rgb.expand(-1, -1, s, s), image)
        image = torch.where(ring[:, None], torch.ones(()), image)
        self.images = ((image.clamp(0, 1) - 0.5) / 0.25).contiguous()

        self.targets: dict[str, Tensor] = {
            "shape": shape,
            "colour": colour,
            "size": (r / s)[:, None],
            "position": torch.stack([cx / s, cy / s], dim=1),
            "outline": outline.float()[:, None],
            "mask": torch.where(inside, shape[:, None, None] + 1, 0),
        }
        if missing > 0:
            for name, t in self.targets.items():
                drop = torch.rand(n, generator=g) < missing
                drop = drop.view(-1, *([1] * (t.dim() - 1))).expand_as(t)
                fill = ignore_index if not t.is_floating_point() else math.nan
                self.targets[name] = t.masked_fill(drop, fill)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.images[i], {k: v[i] for k, v in self.targets.items()}

    def tasks(self) -> list[Task]:
        """The six tasks of this set."""
        return [
            Task("shape", "ce", len(SHAPES)),
            Task("colour", "ce", len(COLOURS)),
            Task("size", "mse", 1),
            Task("position", "mse", 2),
            Task("outline", "bce", 1),
            Task("mask", "ce", len(SHAPES) + 1, dense=True),
        ]
