"""Python entry points of mtlcore's compiled operators.

Each op lives in ``torch.ops.mtlcore``; the functions here accept Python conveniences
(sequences, Python numbers or one-element tensors for hyperparameters), document the
contract, and next to each one sit its fake kernel (so ``torch.compile(fullgraph=True)`` traces
it) and, for differentiable ops, its autograd registration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["adam_", "sgd_"]


def as_float(name: str, value: float | Tensor) -> float:
    """A hyperparameter given as a number or a one-element tensor, as a Python float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        return float(value.item())
    return float(value)


def _no_tensors(op: str, **lists: Sequence[Tensor]) -> bool:
    """True for a call with no parameters (nothing to do; the dispatcher needs a tensor to pick
    a device). Other lists must then be empty too."""
    if len(lists["params"]) != 0:
        return False
    for name, ts in lists.items():
        if len(ts) != 0:
            raise ValueError(f"mtlcore.{op}: {name} has {len(ts)} tensors but params has 0")
    return True


# --------------------------------------------------------------------------------------------
# sgd_
# --------------------------------------------------------------------------------------------


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float | Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Fused in-place SGD update of many tensors, with ``torch.optim.SGD``'s arithmetic.

    For each index ``i`` (all tensors of one call share a device and a dtype)::

        g = grads[i] / grad_scale              (then stored back into grads[i])
        g = -g if maximize
        g = g + weight_decay * params[i]       if weight_decay != 0
        b = g if is_first_step else momentum * b + (1 - dampening) * g      if momentum != 0
        g = g + momentum * b if nesterov else b                             if momentum != 0
        params[i] -= lr * g

    ``momentum_buffers`` may be empty when ``momentum == 0``. ``grad_scale`` and ``found_inf``
    are one-element float32 tensors on the parameters' device, as ``torch.amp.GradScaler``
    hands them to fused optimizers: a nonzero ``found_inf`` skips the whole update. Supported
    dtypes: float32 and float64 on CPU; float16, bfloat16, float32 and float64 on CUDA (math in
    float32 or better).
    """
    if _no_tensors("sgd_", params=params, grads=grads, momentum_buffers=momentum_buffers):
        return
    torch.ops.mtlcore.sgd_(
        list(params),
        list(grads),
        list(momentum_buffers),
        lr=as_float("lr", lr),
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=float(weight_decay),
        nesterov=bool(nesterov),
        maximize=bool(maximize),
        is_first_step=bool(is_first_step),
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


@torch.library.register_fake("mtlcore::sgd_")
def _sgd_fake(params, grads, momentum_buffers, **kwargs) -> None:
    return None


# --------------------------------------------------------------------------------------------
# adam_
# --------------------------------------------------------------------------------------------


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Fused in-place Adam / AdamW update, with ``torch.optim.Adam`` / ``AdamW``'s arithmetic.

    ``state_steps[i]`` is a one-element tensor holding the step count *including* this update
    (increment it before the call, as ``torch.optim`` does); each parameter may be at its own
    step. For each index ``i``, with ``t = state_steps[i]``::

        g = grads[i] / grad_scale                  (then stored back into grads[i])
        g = -g if maximize
        p *= 1 - lr * weight_decay                 if decoupled_weight_decay (AdamW)
        g = g + weight_decay * p                   otherwise, if weight_decay != 0
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v); use vmax for v        if amsgrad
        p -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    ``max_exp_avg_sqs`` may be empty unless ``amsgrad``. ``grad_scale`` / ``found_inf`` follow
    ``torch.amp.GradScaler``'s fused-optimizer protocol (see :func:`sgd_`).
    """
    if _no_tensors(
        "adam_",
        params=params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        state_steps=state_steps,
    ):
        return
    torch.ops.mtlcore.adam_(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(max_exp_avg_sqs),
        list(state_steps),
        lr=as_float("lr", lr),
        beta1=as_float("beta1", beta1),
        beta2=as_float("beta2", beta2),
        eps=float(eps),
        weight_decay=float(weight_decay),
        amsgrad=bool(amsgrad),
        maximize=bool(maximize),
        decoupled_weight_decay=bool(decoupled_weight_decay),
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


@torch.library.register_fake("mtlcore::adam_")
def _adam_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs
) -> None:
    return None
