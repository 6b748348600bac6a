"""The Shapes synthetic multi-task set: deterministic, labels consistent with the images."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from mtlcore.data import Shapes


def test_shapes_is_deterministic_and_splits_differ():
    a, b = Shapes(64, seed=3), Shapes(64, seed=3)
    assert torch.equal(a.images, b.images)
    for k in a.targets:
        assert torch.equal(a.targets[k], b.targets[k])
    test = Shapes(64, split="test", seed=3)
    assert not torch.equal(a.images, test.images)
    assert not torch.equal(a.images, Shapes(64, seed=4).images)


def test_shapes_labels_describe_the_images():
    data = Shapes(200, seed=0)
    n, s = len(data), data.image_size
    assert data.images.shape == (n, 3, s, s)
    t = data.targets
    assert t["shape"].shape == (n,) and int(t["shape"].max()) <= 2
    assert t["colour"].shape == (n,) and int(t["colour"].max()) <= 3
    assert t["size"].shape == (n, 1) and t["position"].shape == (n, 2)
    assert t["outline"].shape == (n, 1) and set(t["outline"].unique().tolist()) <= {0.0, 1.0}
    assert t["mask"].shape == (n, s, s)
    # The mask's class is the shape's, and its area grows with the size.
    for i in range(n):
        classes = t["mask"][i].unique().tolist()
        assert classes == [0, int(t["shape"][i]) + 1]
    area = (t["mask"] > 0).flatten(1).sum(1).float()
    radius = t["size"][:, 0] * s
    circles = t["shape"] == 0
    ratio = area[circles] / (math.pi * radius[circles] ** 2)
    assert ratio.mean().item() == pytest.approx(1.0, abs=0.1)
    # The shape's centre of mass is its position.
    _ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    inside = (t["mask"] > 0).float()
    cx = (inside * xs).flatten(1).sum(1) / area
    assert torch.allclose(cx[circles] / s, t["position"][circles, 0], atol=0.03)


def test_shapes_missing_labels_and_tasks():
    data = Shapes(500, seed=1, missing=0.3)
    assert 0.2 < (data.targets["shape"] == -100).float().mean() < 0.4
    assert 0.2 < torch.isnan(data.targets["size"]).float().mean() < 0.4
    missing_masks = (data.targets["mask"] == -100).flatten(1).all(1)
    assert 0.2 < missing_masks.float().mean() < 0.4
    tasks = {t.name: t for t in data.tasks()}
    assert set(tasks) == set(data.targets)
    assert tasks["mask"].dense and tasks["mask"].num_outputs == 4
    image, target = next(iter(DataLoader(data, batch_size=8)))
    assert image.shape == (8, 3, 32, 32) and target["mask"].shape == (8, 32, 32)
    with pytest.raises(ValueError, match="split"):
        Shapes(4, split="val")
