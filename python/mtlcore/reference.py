"""Pure-PyTorch versions of every mtlcore op: the oracle the kernels are tested against.

They follow the documented arithmetic of each op step by step with ordinary tensor operations,
one tensor at a time; they are slow and meant for tests and for reading, not for training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["adam_", "apply_activation", "conv2d_act", "max_pool2d", "multitask_loss", "sgd_"]


def _skip(found_inf: Tensor | None) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


def _unscale(grad: Tensor, grad_scale: Tensor | None) -> Tensor:
    if grad_scale is None:
        return grad
    grad.copy_(grad / grad_scale.to(grad.dtype))
    return grad


@torch.no_grad()
def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    is_first_step: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Reference of :func:`mtlcore.ops.sgd_` (same signature, same in-place effects)."""
    if _skip(found_inf):
        return
    for i, p in enumerate(params):
        g = _unscale(grads[i], grad_scale)
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + p * weight_decay
        if momentum != 0:
            buf = momentum_buffers[i]
            b = g if is_first_step else buf * momentum + g * (1 - dampening)
            buf.copy_(b)
            g = g + b * momentum if nesterov else b
        p.copy_(p - g * lr)


@torch.no_grad()
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
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
    """Reference of :func:`mtlcore.ops.adam_` (same signature, same in-place effects)."""
    if _skip(found_inf):
        return
    for i, p in enumerate(params):
        step = float(state_steps[i].item())
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        g = _unscale(grads[i], grad_scale)
        if maximize:
            g = -g
        pv = p
        if weight_decay != 0:
            if decoupled_weight_decay:
                pv = p * (1 - lr * weight_decay)
            else:
                g = g + p * weight_decay
        m = exp_avgs[i] * beta1 + g * (1 - beta1)
        v = exp_avg_sqs[i] * beta2 + g * g * (1 - beta2)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if amsgrad:
            v = torch.maximum(max_exp_avg_sqs[i], v)
            max_exp_avg_sqs[i].copy_(v)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        p.copy_(pv - m * step_size / denom)


def apply_activation(z: Tensor, name: str, negative_slope: float = 0.01) -> Tensor:
    """The activation ``name`` of :data:`mtlcore.ops.ACTIVATIONS` applied to ``z``."""
    if name == "identity":
        return z
    if name == "relu":
        return F.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if name == "gelu":
        return F.gelu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "silu":
        return F.silu(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {name!r}")


def conv2d_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> Tensor:
    """``act(F.conv2d(...))``: the composition :func:`mtlcore.ops.conv2d_act` fuses
    (differentiable through autograd)."""
    z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return apply_activation(z, activation, negative_slope)


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """F.max_pool2d's output size along one dimension."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d(
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """Max pooling written out with ``unfold``: every window's values side by side, and the
    element :func:`mtlcore.ops.max_pool2d` selects picked with ``gather`` (differentiable, so
    each window's gradient reaches that element): among the window's elements inside the
    input, the last NaN if there is one, otherwise the first maximum."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    n, c, h, w = input.shape
    oh = _pool_size(h, kh, sh, ph, dh, ceil_mode)
    ow = _pool_size(w, kw, sw, pw, dw, ceil_mode)
    # Pad to every window's full extent (ceil_mode windows may reach past the padding).
    extra_h = max(0, (oh - 1) * sh + dh * (kh - 1) + 1 - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + dw * (kw - 1) + 1 - (w + 2 * pw))
    pads = (pw, pw + extra_w, ph, ph + extra_h)
    x = F.pad(input, pads, value=-math.inf)
    valid = F.pad(torch.ones_like(input, dtype=torch.bool), pads, value=False)

    def windows(t: Tensor) -> Tensor:  # [N, C, OH * OW, kh * kw]
        u = t.unfold(2, dh * (kh - 1) + 1, sh)[..., ::dh].unfold(3, dw * (kw - 1) + 1, sw)
        u = u[..., ::dw][:, :, :oh, :ow]
        return u.reshape(n, c, oh * ow, kh * kw)

    vals, ok = windows(x), windows(valid)
    nan = torch.isnan(vals) & ok
    last_nan = (kh * kw - 1) - nan.flip(-1).int().argmax(-1)
    finite = torch.where(ok & ~nan, vals, torch.full_like(vals, -math.inf))
    best = finite.max(-1, keepdim=True).values
    first_max = ((finite == best) & ok).int().argmax(-1)
    index = torch.where(nan.any(-1), last_nan, first_max)
    out = vals.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return out.reshape(n, c, oh, ow)


def task_loss(
    logits: Tensor,
    target: Tensor,
    kind: str,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """One task's mean loss over its valid elements (0 when there is none), in float32 (float64
    for float64 logits), as :func:`multitask_loss` defines it. Differentiable; the gradient of a
    task with no valid element is zero, not NaN."""
    math = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(math)
    if kind == "ce":
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        logp = torch.log_softmax(x, dim=1)
        nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = nll
        if label_smoothing != 0:  # (a -inf logit makes the smoothing term inf, as in F.)
            loss = (1.0 - label_smoothing) * nll + label_smoothing * -logp.mean(dim=1)
    elif kind in ("bce", "mse", "l1"):
        valid = ~torch.isnan(target)
        y = torch.where(valid, target.to(math), torch.zeros((), dtype=math, device=x.device))
        if kind == "bce":
            loss = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        elif kind == "mse":
            loss = (x - y).square()
        else:
            loss = (x - y).abs()
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    loss = torch.where(valid, loss, torch.zeros((), dtype=math, device=x.device))
    count = valid.sum()
    return loss.sum() / count.clamp(min=1).to(math)


def multitask_loss(
    logits: Sequence[Tensor],
    targets: Sequence[Tensor],
    kinds: Sequence[str],
    weights: Tensor | None = None,
    relation: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(total, per_task)`` of :func:`mtlcore.ops.multitask_loss`, one task at a time::

    total = sum_i weights[i] * per_task[i] + sum_ij relation[i, j] * per_task[i] * per_task[j]
    """
    per_task = torch.stack(
        [
            task_loss(x, y, k, ignore_index, label_smoothing)
            for x, y, k in zip(logits, targets, kinds, strict=True)
        ]
    )
    total = per_task.sum() if weights is None else (weights.to(per_task.dtype) * per_task).sum()
    if relation is not None:
        r = relation.to(per_task.dtype)
        total = total + (r * per_task[:, None] * per_task[None, :]).sum()
    return total, per_task
