"""SGD on the fused ``mtlcore.sgd_`` update."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from mtlcore.ops import as_float
from mtlcore.optim._common import (
    hooked_step,
    params_with_grads,
    reject_unsupported,
    run_closure,
    scaler_tensors,
)

# The compiled op itself: the step has already put its arguments in the op's form.
_sgd = torch.ops.mtlcore.sgd_.default


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

    @hooked_step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the
        loss."""
        loss = run_closure(closure)
        for group in self.param_groups:
            for params, grads in params_with_grads(group, "SGD"):
                self._update(group, params, grads)
        return loss

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        grad_scale, found_inf = scaler_tensors(self, params[0].device)
        momentum = float(group["momentum"])
        kwargs = dict(
            lr=as_float("lr", group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            weight_decay=as_float("weight_decay", group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
        if momentum == 0:
            _sgd(params, grads, [], is_first_step=False, **kwargs)
            return
        state = self.state
        bufs = [state[p].get("momentum_buffer") for p in params]
        if all(b is not None for b in bufs):
            _sgd(params, grads, bufs, is_first_step=False, **kwargs)
            return
        # Parameters with a momentum buffer take the regular update; the others (first step)
        # start their buffer from the gradient, as torch.optim.SGD does.
        started = [i for i, b in enumerate(bufs) if b is not None]
        first = [i for i, b in enumerate(bufs) if b is None]
        if started:
            _sgd(
                [params[i] for i in started],
                [grads[i] for i in started],
                [bufs[i] for i in started],
                is_first_step=False,
                **kwargs,
            )
        new_bufs = [torch.empty_like(grads[i], memory_format=torch.preserve_format) for i in first]
        _sgd(
            [params[i] for i in first],
            [grads[i] for i in first],
            new_bufs,
            is_first_step=True,
            **kwargs,
        )
        if found_inf is not None and found_inf.item() != 0:
            return  # a skipped step: the new buffers hold nothing yet
        for i, buf in zip(first, new_bufs, strict=True):
            state[params[i]]["momentum_buffer"] = buf
