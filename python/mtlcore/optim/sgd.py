"""SGD on the fused ``mtlcore.sgd_`` update."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from mtlcore import ops
from mtlcore.optim._common import (
    as_float,
    grad_of,
    group_by_device_and_dtype,
    reject_unsupported,
    run_closure,
    scaler_tensors,
)


class SGD(torch.optim.SGD):
    """Drop-in for :class:`torch.optim.SGD` whose step is one fused kernel call per device and
    dtype (momentum, dampening, Nesterov, weight decay, maximize as in torch).

    Same constructor, param groups and ``state_dict`` layout as ``torch.optim.SGD`` (a torch
    state dict loads into this optimizer and back). ``foreach`` and ``fused`` are accepted and
    kept in the param groups for compatibility; the update is always fused. Works with
    ``torch.amp.GradScaler`` without a separate unscale pass.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported("SGD", differentiable=differentiable)
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=False,
            fused=fused,
        )
        self._step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the
        loss."""
        loss = run_closure(closure)
        for group in self.param_groups:
            momentum = float(group["momentum"])
            with_grad = [(p, g) for p in group["params"] if (g := grad_of(p, "SGD")) is not None]
            for (device, _), items in group_by_device_and_dtype(with_grad).items():
                self._update(group, momentum, device, items)
        return loss

    def _update(
        self,
        group: dict[str, Any],
        momentum: float,
        device: torch.device,
        items: list[tuple[Tensor, Tensor]],
    ) -> None:
        grad_scale, found_inf = scaler_tensors(self, device)
        kwargs = dict(
            lr=as_float(group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            weight_decay=as_float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        if momentum == 0:
            ops.sgd_([p for p, _ in items], [g for _, g in items], [], **kwargs)
            return
        # Parameters with a momentum buffer take the regular update; the others (first step)
        # start their buffer from the gradient, as torch.optim.SGD does.
        started, first = [], []
        for p, g in items:
            buf = self.state[p].get("momentum_buffer")
            (first if buf is None else started).append((p, g, buf))
        if started:
            ops.sgd_(*map(list, zip(*started, strict=True)), is_first_step=False, **kwargs)
        if first:
            bufs = [torch.empty_like(g, memory_format=torch.preserve_format) for _, g, _ in first]
            params = [p for p, _, _ in first]
            ops.sgd_(params, [g for _, g, _ in first], bufs, is_first_step=True, **kwargs)
            if found_inf is not None and found_inf.item() != 0:
                return  # skipped step: the buffers hold nothing yet
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf
