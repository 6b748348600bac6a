"""Helpers shared by mtlcore's optimizers."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import Tensor


def grad_of(p: Tensor, optimizer: str) -> Tensor | None:
    """The gradient to use for ``p``, or None to skip it; rejects sparse gradients."""
    g = p.grad
    if g is not None and g.is_sparse:
        raise RuntimeError(f"mtlcore.optim.{optimizer} does not support sparse gradients")
    return g


def group_by_device_and_dtype(
    items: Iterable[tuple[Tensor, Any]],
) -> dict[Hashable, list[tuple[Tensor, Any]]]:
    """Splits (param, payload) pairs by the param's (device, dtype): one fused call each."""
    groups: dict[Hashable, list[tuple[Tensor, Any]]] = {}
    for p, payload in items:
        groups.setdefault((p.device, p.dtype), []).append((p, payload))
    return groups


def scaler_tensors(
    optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """``grad_scale`` / ``found_inf`` that ``torch.amp.GradScaler`` set on the optimizer for this
    step (its fused-optimizer protocol), moved to ``device``."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
    return grad_scale, found_inf


def run_closure(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def reject_unsupported(name: str, **flags: bool) -> None:
    for flag, value in flags.items():
        if value:
            raise ValueError(f"mtlcore.optim.{name} does not support {flag}=True")


def as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)
