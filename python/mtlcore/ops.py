"""Python entry points of mtlcore's compiled operators.

Each op lives in ``torch.ops.mtlcore``; the functions here accept Python conveniences
(sequences, Python numbers or one-element tensors for hyperparameters), document the
contract, and next to each one sits its fake kernel (so ``torch.compile(fullgraph=True)`` traces
it). The differentiable ops' autograd is in C++ (csrc/common/*_autograd.cpp: graph nodes
registered for the Autograd key, without the tens of microseconds a Python registration costs
per call).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = [
    "ACTIVATIONS",
    "LOSS_KINDS",
    "adam_",
    "conv2d_act",
    "max_pool2d",
    "multitask_loss",
    "sgd_",
]


def as_float(name: str, value: float | Tensor) -> float:
    """A hyperparameter given as a number or a one-element tensor, as a Python float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor")
        return float(value.item())
    return float(value)


def raise_for_layout(op: str, error: NotImplementedError, **named: object) -> None:
    """Called when the dispatcher found no kernel for an op's arguments: raises a ValueError
    naming the argument that is not a dense (strided) tensor, such as a sparse one, if there is
    one; otherwise returns (the caller re-raises the dispatcher's error)."""
    for name, value in named.items():
        items = (
            [(f"{name}[{i}]", t) for i, t in enumerate(value)]
            if isinstance(value, (list, tuple))
            else [(name, value)]
        )
        for label, t in items:
            if isinstance(t, Tensor) and t.layout != torch.strided:
                raise ValueError(
                    f"mtlcore.{op}: {label} has layout {t.layout}; only dense (strided) tensors "
                    "are supported"
                ) from error


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
    params, grads, momentum_buffers = list(params), list(grads), list(momentum_buffers)
    try:
        torch.ops.mtlcore.sgd_(
            params,
            grads,
            momentum_buffers,
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
    except NotImplementedError as e:
        raise_for_layout("sgd_", e, params=params, grads=grads, momentum_buffers=momentum_buffers)
        raise


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
    (increment it before the call, as ``torch.optim`` does; below 1 is an error: a
    ``ValueError`` on the CPU, a device-side assertion on CUDA, where the counters are read
    without synchronising); each parameter may be at its own step. For each index ``i``, with
    ``t = state_steps[i]``::

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
    lists = {
        "params": list(params),
        "grads": list(grads),
        "exp_avgs": list(exp_avgs),
        "exp_avg_sqs": list(exp_avg_sqs),
        "max_exp_avg_sqs": list(max_exp_avg_sqs),
        "state_steps": list(state_steps),
    }
    try:
        torch.ops.mtlcore.adam_(
            *lists.values(),
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
    except NotImplementedError as e:
        raise_for_layout("adam_", e, **lists)
        raise


@torch.library.register_fake("mtlcore::adam_")
def _adam_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs
) -> None:
    return None


# --------------------------------------------------------------------------------------------
# conv2d_act
# --------------------------------------------------------------------------------------------

#: The activations conv2d_act fuses (gelu is the exact erf form, gelu_tanh the tanh one).
ACTIVATIONS = ("identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


def check_activation(activation: str) -> None:
    """Raises ValueError unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"mtlcore.conv2d_act: unknown activation {activation!r}; expected one of "
            + ", ".join(ACTIVATIONS)
        )


def conv_padding(
    padding: int | Sequence[int] | str,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """``padding`` as the op's four values (top, bottom, left, right).

    Accepts what ``F.conv2d`` accepts: an int, a pair, ``"valid"`` (no padding) or ``"same"``
    (output size = input size; stride 1 only; an even dilated kernel extent pads one more at
    the bottom/right, as PyTorch does).
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding != "same":
            raise ValueError(
                f"mtlcore.conv2d_act: padding must be an int, a pair, 'valid' or 'same', "
                f"got {padding!r}"
            )
        if any(s != 1 for s in stride):
            raise ValueError("mtlcore.conv2d_act: padding='same' needs stride 1")
        out = []
        for k, d in zip(kernel_size, dilation, strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    pair = _pair(padding)
    if len(pair) != 2:
        raise ValueError(
            f"mtlcore.conv2d_act: padding must be an int, a pair, 'valid' or 'same', got {padding}"
        )
    ph, pw = pair
    return [int(ph), int(ph), int(pw), int(pw)]


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype conv2d_act computes in under autocast on ``device_type`` (None: no autocast).
    CUDA follows the autocast dtype (fp16/bf16 kernels, fp32 accumulation); the CPU kernels
    compute in float32, so bf16 inputs are upcast and the output is float32."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if device_type == "cpu" else torch.get_autocast_dtype(device_type)


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
    """``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups))`` in one kernel.

    The bias and the activation are applied to each output tile before it is stored; the
    backward applies the activation's derivative and reduces the bias gradient in its first
    pass over the output gradient, then computes only the gradients that are needed.
    Differentiable once: differentiating a gradient computed with ``create_graph=True``
    raises (no double backward).

    Args:
        input: ``[N, C, H, W]``, any strides (NCHW, channels_last, views).
        weight: ``[K, C / groups, R, S]``. bias: ``[K]`` or None.
        stride, dilation: int or pair. padding: int, pair, ``"valid"`` or ``"same"``.
        groups: number of channel groups (``groups == C``: depthwise).
        activation: one of :data:`ACTIVATIONS`; ``negative_slope`` is leaky_relu's.

    Returns a new contiguous NCHW tensor. dtypes: float32/float64 on CPU; float32, float16,
    bfloat16, float64 on CUDA (fp32 accumulation). Under ``torch.autocast`` CUDA computes in the
    autocast dtype and the CPU in float32 (bf16 inputs are upcast; the output is float32).

    Memory kept for backward: input and weight (as autograd keeps them for F.conv2d) plus one
    output-sized tensor: the output itself for identity, relu, leaky_relu (slope >= 0), sigmoid
    and tanh, or the pre-activation for gelu, gelu_tanh and silu.
    """
    check_activation(activation)
    stride_ = [int(v) for v in _pair(stride)]
    dilation_ = [int(v) for v in _pair(dilation)]
    kernel = list(weight.shape[-2:]) if weight.dim() == 4 else [1, 1]
    padding_ = conv_padding(padding, kernel, stride_, dilation_)
    cast = _autocast_dtype(input.device.type)
    if cast is not None and input.is_floating_point():
        input, weight = input.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    args = (input, weight, bias, stride_, padding_, dilation_, int(groups), activation)
    try:
        # Autograd in C++ (csrc/common/conv2d_act_autograd.cpp): it keeps the pre-activation
        # instead of the output when the activation's derivative needs it.
        return torch.ops.mtlcore.conv2d_act(*args, float(negative_slope))
    except NotImplementedError as e:
        raise_for_layout("conv2d_act", e, input=input, weight=weight, bias=bias)
        raise


def _conv_output_shape(input: Tensor, weight: Tensor, stride, padding, dilation) -> list:
    """[N, K, OH, OW] of conv2d_act for the op's arguments (padding: 2 or 4 values)."""
    top, bottom, left, right = padding if len(padding) == 4 else [padding[0]] * 2 + [padding[1]] * 2
    extent_h = dilation[0] * (weight.shape[2] - 1) + 1
    extent_w = dilation[1] * (weight.shape[3] - 1) + 1
    oh = (input.shape[2] + top + bottom - extent_h) // stride[0] + 1
    ow = (input.shape[3] + left + right - extent_w) // stride[1] + 1
    return [input.shape[0], weight.shape[0], oh, ow]


@torch.library.register_fake("mtlcore::conv2d_act")
def _conv2d_act_fake(input, weight, bias, stride, padding, dilation, groups, activation, slope):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "input and weight must be 4-d")
    shape = _conv_output_shape(input, weight, stride, padding, dilation)
    return input.new_empty(shape)


@torch.library.register_fake("mtlcore::conv2d_act_with_preact")
def _conv2d_act_with_preact_fake(
    input, weight, bias, stride, padding, dilation, groups, activation, slope
):
    out = _conv2d_act_fake(input, weight, bias, stride, padding, dilation, groups, activation, 0.0)
    return out, torch.empty_like(out)


@torch.library.register_fake("mtlcore::conv2d_act_backward")
def _conv2d_act_backward_fake(
    grad_output, input, weight, saved, stride, padding, dilation, groups, activation, slope, mask
):
    empty = input.new_empty([0])
    grad_input = input.new_empty(input.shape)
    grad_weight = weight.new_empty(weight.shape)
    grad_bias = weight.new_empty([weight.shape[0]])
    return (
        grad_input if mask[0] else empty,
        grad_weight if mask[1] else empty,
        grad_bias if mask[2] else empty,
    )


# --------------------------------------------------------------------------------------------
# max_pool2d
# --------------------------------------------------------------------------------------------


def _pool_pair(name: str, value: int | Sequence[int]) -> list[int]:
    pair = _pair(value)
    try:
        if len(pair) != 2 or any(isinstance(v, bool) for v in pair):
            raise TypeError
        return [operator.index(v) for v in pair]
    except TypeError:
        raise ValueError(
            f"mtlcore.max_pool2d: {name} must be an int or a pair of ints, got {value!r}"
        ) from None


def max_pool2d(
    input: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """``F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)`` (without
    ``return_indices``) on our own kernels.

    The same values and gradients as PyTorch: NaN propagates, a window's gradient goes to its
    first maximum (its last NaN), padding never wins. The backward finds each window's maximum
    again from the input instead of keeping an int64 index per output element, so the memory
    kept for backward is the input alone (the tensor the preceding ``conv2d_act`` keeps
    anyway, when it feeds the pool). Differentiable once: differentiating a gradient computed
    with ``create_graph=True`` raises (no double backward).

    Args:
        input: ``[N, C, H, W]`` or ``[C, H, W]``, any strides.
        kernel_size, stride (default: kernel_size), padding (at most half the kernel),
        dilation: int or pair.
        ceil_mode: round the output size up, as ``F.max_pool2d``.

    Returns channels_last when ``input`` is channels_last, contiguous NCHW otherwise. dtypes:
    float32, float64, float16, bfloat16 on CPU and CUDA (the maximum is exact in any dtype).
    """
    kernel = _pool_pair("kernel_size", kernel_size)
    args = (
        kernel,
        _pool_pair("stride", stride if stride is not None else kernel),
        _pool_pair("padding", padding),
        _pool_pair("dilation", dilation),
        bool(ceil_mode),
    )
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    try:
        out = torch.ops.mtlcore.max_pool2d(x, *args)
    except NotImplementedError as e:
        raise_for_layout("max_pool2d", e, input=input)
        raise
    return out.squeeze(0) if unbatched else out


def _pool_output_size(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_like(input: Tensor, rows, cols) -> Tensor:
    """A new tensor of the layout the max_pool2d kernels give (common/max_pool2d_args.h)."""
    out = input.new_empty((input.shape[0], input.shape[1], rows, cols))
    if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


@torch.library.register_fake("mtlcore::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    torch._check(input.dim() == 4, lambda: "mtlcore.max_pool2d: input must be 4-d")
    rows, cols = (
        _pool_output_size(
            input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode
        )
        for i in range(2)
    )
    return _pool_like(input, rows, cols)


@torch.library.register_fake("mtlcore::max_pool2d_backward")
def _max_pool2d_backward_fake(
    grad_output, input, kernel_size, stride, padding, dilation, ceil_mode
):
    return _pool_like(input, input.shape[2], input.shape[3])


# max_pool2d's autograd is in C++ (csrc/common/max_pool2d_autograd.cpp).


# --------------------------------------------------------------------------------------------
# multitask_loss
# --------------------------------------------------------------------------------------------

#: The task kinds multitask_loss computes.
LOSS_KINDS = ("ce", "bce", "mse", "l1")


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
    """All task losses of a multi-task model, their weighted and coupled total, in one call.

    Task ``i`` is ``kinds[i]`` on ``logits[i]`` and ``targets[i]``:

    - ``"ce"``: softmax cross-entropy over dim 1 of ``[B, C]`` or dense ``[B, C, d1, ...]``
      logits, int64 class targets ``[B]`` / ``[B, d1, ...]``; ``ignore_index`` and
      ``label_smoothing`` exactly as ``F.cross_entropy``.
    - ``"bce"``: ``F.binary_cross_entropy_with_logits``; ``"mse"``, ``"l1"``: regression.
      Float targets of the logits' shape; a NaN target is a missing label.

    Returns ``(total, per_task)``: ``per_task[i]`` is task ``i``'s mean loss over its valid
    elements, 0 (with zero gradient, never NaN) when it has none, and::

        total = sum_i weights[i] * per_task[i] + sum_ij relation[i, j] * per_task[i] * per_task[j]

    ``weights`` ``[T]`` defaults to ones, ``relation`` ``[T, T]`` to zero. Differentiable in
    the logits, ``weights`` and ``relation``, for gradients flowing into ``total``,
    ``per_task`` or both, once (differentiating a gradient computed with ``create_graph=True``
    raises: no double backward). The gradient with respect to each task's logits is computed in the
    forward pass, in the same pass as its loss; backward only scales it by
    ``d total / d per_task[i] = weights[i] + sum_j (relation[i, j] + relation[j, i]) per_task[j]``
    (on the CPU not even that when every label of the task is present, the gradient flows into
    ``total`` alone and there is no relation: the forward already wrote it times
    ``weights[i] / n_i``, except for float16 logits). Memory kept for backward: one gradient the
    size of each task's logits, in their dtype.

    Math in float32 whatever the logits' dtype (float64 for float64 logits); ``total`` and
    ``per_task`` are float32 (float64). Logits: float32, float64, float16, bfloat16; all tasks
    in one dtype (logits of mixed dtypes are promoted here). Heads of one ``Linear`` split with
    ``torch.split`` are read in place. Under ``torch.autocast``, fp16/bf16 logits are read as
    they are (no cast to float32 is needed: the math is in float32). Gradients are rounded to
    the logits' dtype once in the forward pass and once more when backward scales them (not
    where backward leaves them, above).
    """
    logits = list(logits)
    targets = list(targets)
    kinds = [str(k) for k in kinds]
    if not (len(logits) == len(targets) == len(kinds)):
        raise ValueError(
            "mtlcore.multitask_loss: logits, targets and kinds must have one entry per task, "
            f"got {len(logits)}, {len(targets)} and {len(kinds)}"
        )
    if len(logits) == 0:
        raise ValueError("mtlcore.multitask_loss: needs at least one task")
    for name, items in (("logits", logits), ("targets", targets)):
        for i, t in enumerate(items):
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"mtlcore.multitask_loss: {name}[{i}] must be a Tensor, got {type(t).__name__}"
                )
    dtypes = {x.dtype for x in logits}
    if len(dtypes) > 1 and all(d.is_floating_point for d in dtypes):
        common = logits[0].dtype
        for x in logits[1:]:
            common = torch.promote_types(common, x.dtype)
        logits = [x.to(common) for x in logits]
    try:
        return torch.ops.mtlcore.multitask_loss(
            logits, targets, kinds, weights, relation, int(ignore_index), float(label_smoothing)
        )
    except NotImplementedError as e:
        raise_for_layout(
            "multitask_loss", e, logits=logits, targets=targets, weights=weights, relation=relation
        )
        raise


def _loss_dtype(logits: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if logits[0].dtype == torch.float64 else torch.float32


@torch.library.register_fake("mtlcore::multitask_loss")
def _multitask_loss_fake(logits, targets, kinds, weights, relation, ignore_index, smoothing):
    torch._check(len(logits) >= 1, lambda: "multitask_loss needs at least one task")
    dtype = _loss_dtype(logits)
    return logits[0].new_empty([], dtype=dtype), logits[0].new_empty([len(logits)], dtype=dtype)


@torch.library.register_fake("mtlcore::multitask_loss_with_grad")
def _multitask_loss_with_grad_fake(
    logits, targets, kinds, weights, relation, ignore_index, smoothing
):
    total, per_task = _multitask_loss_fake(
        logits, targets, kinds, weights, relation, ignore_index, smoothing
    )
    grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in logits]
    return total, per_task, torch.empty_like(per_task), grads


@torch.library.register_fake("mtlcore::multitask_loss_backward")
def _multitask_loss_backward_fake(
    grad_total, grad_per_task, per_task, grad_scale, grads, weights, relation, mask
):
    t = per_task.shape[0]
    grad_logits = [g.new_empty(g.shape) if mask[0] else g.new_empty([0]) for g in grads]
    grad_weights = per_task.new_empty([t] if mask[1] else [0])
    grad_relation = per_task.new_empty([t, t] if mask[2] else [0])
    return grad_logits, grad_weights, grad_relation


@torch.library.register_fake("mtlcore::multitask_loss_backward_")
def _multitask_loss_backward_inplace_fake(
    grad_total, grad_per_task, per_task, grad_scale, grads, weights, relation
) -> None:
    return None
