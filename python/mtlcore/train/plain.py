"""The plain-PyTorch twin of a fused training step: what mtlcore is measured against.

:func:`twin_models` builds the same SmallCNN multi-task model twice from the same weights: once
on mtlcore's fused modules, once from ``nn.Conv2d`` + relu; :func:`fused_step` and
:func:`plain_step` are one training step of each (forward, loss, backward, optimizer), the
second with ``F.cross_entropy`` & co. and ``torch.optim.Adam(fused=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlcore import optim
from mtlcore.models import SmallCNN
from mtlcore.nn import LinearHead, MultiTaskLoss, MultiTaskModel
from mtlcore.tasks import Task

__all__ = ["fused_step", "plain_step", "twin_models"]

_FUNCTIONAL = {
    "ce": F.cross_entropy,
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
}


def twin_models(
    tasks: Sequence[Task],
    channels: int,
    image_size: int,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
):
    """(fused model, its loss, its optimizer), (plain model, its optimizer), same weights.
    ``optimizer``: ``adam`` (mtlcore.optim.Adam vs torch.optim.Adam(fused=True)) or ``sgd``
    (momentum 0.9: mtlcore.optim.SGD vs torch.optim.SGD(fused=True))."""
    torch.manual_seed(seed)
    heads = {t.name: LinearHead(128, t.num_outputs) for t in tasks}
    fused = MultiTaskModel(SmallCNN(channels, image_size), heads)
    plain_heads = {t.name: LinearHead(128, t.num_outputs) for t in tasks}
    plain = MultiTaskModel(SmallCNN(channels, image_size, fused=False), plain_heads)
    plain.load_state_dict(fused.state_dict())
    loss = MultiTaskLoss(tasks, [t.weight for t in tasks])
    if optimizer == "adam":
        fused_opt = optim.Adam(fused.parameters(), lr=lr)
        plain_opt = torch.optim.Adam(plain.parameters(), lr=lr, fused=True)
    elif optimizer == "sgd":
        fused_opt = optim.SGD(fused.parameters(), lr=lr, momentum=0.9)
        plain_opt = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9, fused=True)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    return (fused, loss, fused_opt), (plain, plain_opt)


def fused_step(model, loss, opt, x: Tensor, y: dict[str, Tensor]) -> Tensor:
    total, _ = loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return total.detach()


def plain_step(model, opt, tasks: Sequence[Task], x: Tensor, y: dict[str, Tensor]) -> Tensor:
    out = model(x)
    total = sum(t.weight * _FUNCTIONAL[t.kind](out[t.name], y[t.name]) for t in tasks)
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return total.detach()
