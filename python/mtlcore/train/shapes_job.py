"""The main job on the built-in Shapes set: SmallCNN with one head per task, trained with the
fused loss and optimizer, then evaluated per task (``python -m mtlcore train --data shapes``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mtlcore import optim
from mtlcore.data import Shapes
from mtlcore.models import SmallCNN
from mtlcore.nn import DenseHead, LinearHead, MultiTaskModel
from mtlcore.train.trainer import Trainer

__all__ = ["train_shapes"]


def train_shapes(
    *,
    epochs: int = 3,
    batch_size: int = 64,
    samples: int = 4000,
    optimizer: str = "adam",
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    out_dir: str | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Trains and evaluates; returns ``{task: {metric: value}}`` on the test split."""
    train = Shapes(samples, "train", seed=seed)
    test = Shapes(max(samples // 4, 1), "test", seed=seed)
    tasks = train.tasks()
    torch.manual_seed(seed)
    trunk = SmallCNN(3, train.image_size)
    heads = {
        t.name: DenseHead(trunk.map_channels, t.num_outputs, train.image_size)
        if t.dense
        else LinearHead(trunk.out_features, t.num_outputs)
        for t in tasks
    }
    model = MultiTaskModel(trunk, heads)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    trainer = Trainer(
        model,
        tasks,
        opt,
        device=device,
        batch_size=batch_size,
        seed=seed,
        out_dir=out_dir,
        progress=progress,
    )
    log(
        f"Shapes: {len(train)} train / {len(test)} test images, tasks: "
        + ", ".join(f"{t.name} ({t.kind})" for t in tasks)
    )
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        row = trainer.fit(train, epochs=epoch)[-1]
        log(f"epoch {epoch}: train loss {row['train_loss/total']:.4f}")
    seconds = time.perf_counter() - start
    log(f"{epochs * len(train) / seconds:.0f} images/s on {device} (training)")
    results = trainer.evaluate(test)
    for task in tasks:
        metrics = ", ".join(f"{m} {v:.4f}" for m, v in results[task.name].items())
        log(f"  {task.name:9s} {metrics}")
    return results
