"""Adam and AdamW on the fused ``mtlcore.adam_`` update."""

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
_adam = torch.ops.mtlcore.adam_.default


def _step_dtype() -> torch.dtype:
    # torch.optim keeps the step count in float32 (float64 under a float64 default dtype).
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _adam_step(optimizer: torch.optim.Optimizer, name: str, closure: Callable[[], Any] | None):
    loss = run_closure(closure)
    for group in optimizer.param_groups:
        amsgrad = bool(group["amsgrad"])
        beta1, beta2 = group["betas"]
        for params, grads in params_with_grads(group, name):
            states = [_state_of(optimizer, p, amsgrad) for p in params]
            steps = [s["step"] for s in states]
            grad_scale, found_inf = scaler_tensors(optimizer, params[0].device)
            torch._foreach_add_(steps, 1)
            _adam(
                params,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                steps,
                lr=as_float("lr", group["lr"]),
                beta1=as_float("beta1", beta1),
                beta2=as_float("beta2", beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                amsgrad=amsgrad,
                maximize=bool(group["maximize"]),
                decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)),
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            if found_inf is not None:
                torch._foreach_sub_(steps, [found_inf] * len(steps))  # a skipped step
    return loss


def _state_of(optimizer: torch.optim.Optimizer, p: Tensor, amsgrad: bool) -> dict[str, Tensor]:
    state = optimizer.state[p]
    if len(state) == 0:
        state["step"] = torch.zeros((), dtype=_step_dtype(), device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif state["step"].device != p.device:
        # A state dict from torch.optim keeps the step on the CPU; the kernels want it beside
        # the parameter.
        state["step"] = state["step"].to(p.device)
    if amsgrad and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


class Adam(torch.optim.Adam):
    """Drop-in for :class:`torch.optim.Adam` whose step is one fused kernel call per device and
    dtype (L2 or decoupled weight decay, AMSGrad, maximize as in torch).

    Same constructor, param groups and ``state_dict`` layout as ``torch.optim.Adam`` (a torch
    state dict loads into this optimizer and back). ``foreach`` and ``fused`` are accepted and
    kept for compatibility; the update is always fused. ``capturable`` and ``differentiable``
    are not supported. Works with ``torch.amp.GradScaler`` without a separate unscale pass.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        reject_unsupported("Adam", capturable=capturable, differentiable=differentiable)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        self._step_supports_amp_scaling = True

    @hooked_step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the
        loss."""
        return _adam_step(self, "Adam", closure)


class AdamW(torch.optim.AdamW):
    """Drop-in for :class:`torch.optim.AdamW` (decoupled weight decay) on the fused update;
    see :class:`Adam`."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        reject_unsupported("AdamW", capturable=capturable, differentiable=differentiable)
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        self._step_supports_amp_scaling = True

    @hooked_step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the
        loss."""
        return _adam_step(self, "AdamW", closure)
