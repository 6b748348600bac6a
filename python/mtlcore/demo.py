"""A short demonstration: a small two-output regression network trained with mtlcore.optim."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtlcore import optim

_OPTIMIZERS = {
    "sgd": lambda params: optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: optim.Adam(params, lr=3e-3),
    "adamw": lambda params: optim.AdamW(params, lr=3e-3, weight_decay=1e-2),
}


def train_demo(
    steps: int = 200,
    optimizer: str = "adam",
    device: torch.device | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Fits an MLP to two smooth functions of 8 inputs; returns the loss of every step.

    The data are generated from ``seed``; ``device`` defaults to CUDA when available.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=gen)
    y = torch.stack([torch.sin(x[:, 0]) + 0.5 * x[:, 1], (x[:, 2] * x[:, 3]).tanh()], dim=1)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    ).to(device)
    opt = _OPTIMIZERS[optimizer](model.parameters())
    losses = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {losses[-1]:.5f}")
    if log is not None:
        log(f"{type(opt).__name__} on {device}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses
