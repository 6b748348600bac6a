"""The bad-input table: every wrong input we can think of for each public op and module.

Each case calls mtlcore with one wrong argument and must raise a Python exception whose message
names that argument (``expect``); tests/test_bad_input.py runs every case in a child process of
its own, so a crash (a segfault, an abort) fails that case instead of killing the test run.

Add a case with the :func:`case` decorator; the function takes no argument and calls mtlcore.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import mtlcore
from mtlcore import ops


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # a substring of the exception's message: the argument's name
    errors: tuple[type[BaseException], ...]
    run: Callable[[], object]
    cuda: bool = False  # needs a CUDA device


CASES: dict[str, Case] = {}
_ERRORS = (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError)


def case(name: str, expect: str, errors=_ERRORS, cuda: bool = False):
    def register(fn):
        assert name not in CASES, name
        CASES[name] = Case(name, expect, errors, fn, cuda)
        return fn

    return register


def f32(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def with_tangent(call: Callable[[Callable[[torch.Tensor], torch.Tensor]], object]) -> None:
    """Runs call(dual) inside a forward-mode AD level; dual(t) makes t a dual tensor (with a
    tangent): our ops have no forward-mode formula and must refuse it, naming the argument."""
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        call(lambda t: fwad.make_dual(t, torch.ones_like(t)))


# --------------------------------------------------------------------------------------------
# conv2d_act (the op, its raw schemas and the Conv2dAct module)
# --------------------------------------------------------------------------------------------


def conv(**overrides):
    args = {"input": f32(2, 4, 6, 6), "weight": f32(8, 4, 3, 3), "bias": f32(8)}
    args.update(overrides)
    return ops.conv2d_act(**args)


CONV = {
    "int input": ("input", lambda: conv(input=torch.ones(2, 4, 6, 6, dtype=torch.int64))),
    "half input on cpu": ("input", lambda: conv(input=f32(2, 4, 6, 6, dtype=torch.float16))),
    "weight dtype differs": ("weight", lambda: conv(weight=f32(8, 4, 3, 3, dtype=torch.float64))),
    "bias dtype differs": ("bias", lambda: conv(bias=f32(8, dtype=torch.float64))),
    "input rank 3": ("input", lambda: conv(input=f32(4, 6, 6))),
    "input rank 5": ("input", lambda: conv(input=f32(1, 2, 4, 6, 6))),
    "weight rank 3": ("weight", lambda: conv(weight=f32(8, 4, 3))),
    "bias rank 2": ("bias", lambda: conv(bias=f32(8, 1))),
    "bias length": ("bias", lambda: conv(bias=f32(7))),
    "weight channels": ("weight", lambda: conv(weight=f32(8, 3, 3, 3))),
    "channels not divisible by groups": (
        "groups",
        lambda: conv(weight=f32(9, 2, 3, 3), bias=None, groups=3),
    ),
    "out channels not divisible by groups": (
        "groups",
        lambda: conv(weight=f32(7, 2, 3, 3), bias=None, groups=2),
    ),
    "groups 0": ("groups", lambda: conv(groups=0)),
    "groups negative": ("groups", lambda: conv(groups=-2)),
    "stride 0": ("stride", lambda: conv(stride=0)),
    "stride negative": ("stride", lambda: conv(stride=(1, -1))),
    "stride three values": ("stride", lambda: conv(stride=(1, 1, 1))),
    "dilation 0": ("dilation", lambda: conv(dilation=0)),
    "padding negative": ("padding", lambda: conv(padding=-1)),
    "padding three values": ("padding", lambda: conv(padding=(1, 1, 1))),
    "padding unknown string": ("padding", lambda: conv(padding="full")),
    "padding same with stride": ("padding", lambda: conv(padding="same", stride=2)),
    "kernel larger than input": ("input", lambda: conv(input=f32(2, 4, 2, 2))),
    "empty weight": ("weight", lambda: conv(weight=f32(0, 4, 3, 3), bias=None)),
    "zero-size kernel": ("weight", lambda: conv(weight=f32(8, 4, 0, 3))),
    "input without channels": (
        "channel",
        lambda: conv(input=f32(2, 0, 6, 6), weight=f32(8, 0, 3, 3)),
    ),
    "unknown activation": ("activation", lambda: conv(activation="swish")),
    "activation not a string": ("activation", lambda: conv(activation=None)),
    "negative_slope nan": (
        "negative_slope",
        lambda: conv(activation="leaky_relu", negative_slope=math.nan),
    ),
    "negative_slope inf": (
        "negative_slope",
        lambda: conv(activation="leaky_relu", negative_slope=math.inf),
    ),
    "sparse input": ("input", lambda: conv(input=f32(2, 4, 6, 6).to_sparse())),
    "sparse weight": ("weight", lambda: conv(weight=f32(8, 4, 3, 3).to_sparse())),
}
for _name, (_expect, _fn) in CONV.items():
    case(f"conv2d_act: {_name}", _expect)(_fn)


@case("conv2d_act: sparse gradient into backward", "grad_output")
def _():
    x = f32(2, 4, 6, 6).requires_grad_()
    y = conv(input=x)
    y.backward(torch.ones_like(y).to_sparse())


@case("conv2d_act: weight with a forward-mode tangent", "weight")
def _():
    with_tangent(lambda dual: conv(weight=dual(f32(8, 4, 3, 3))))


@case("conv2d_act_with_preact (raw schema): input with a forward-mode tangent", "input")
def _():
    with_tangent(
        lambda dual: torch.ops.mtlcore.conv2d_act_with_preact(
            dual(f32(2, 4, 6, 6)), f32(8, 4, 3, 3), None, [1, 1], [0, 0], [1, 1], 1, "gelu", 0.0
        )
    )


@case("conv2d_act: weight on another device", "weight", cuda=True)
def _():
    conv(weight=f32(8, 4, 3, 3, device="cuda"), bias=None)


@case("conv2d_act: bias on another device", "bias", cuda=True)
def _():
    conv(input=f32(2, 4, 6, 6, device="cuda"), weight=f32(8, 4, 3, 3, device="cuda"))


def conv_backward(**overrides):
    x, w = f32(2, 4, 6, 6), f32(8, 4, 3, 3)
    y = f32(2, 8, 4, 4)
    args = dict(
        grad_output=f32(2, 8, 4, 4),
        input=x,
        weight=w,
        saved=y,
        stride=[1, 1],
        padding=[0, 0],
        dilation=[1, 1],
        groups=1,
        activation="relu",
        negative_slope=0.01,
        output_mask=[True, True, True],
    )
    args.update(overrides)
    return torch.ops.mtlcore.conv2d_act_backward(*args.values())


BACKWARD = {
    "grad_output shape": ("grad_output", lambda: conv_backward(grad_output=f32(2, 8, 5, 4))),
    "grad_output dtype": (
        "grad_output",
        lambda: conv_backward(grad_output=f32(2, 8, 4, 4, dtype=torch.float64)),
    ),
    "saved shape": ("saved", lambda: conv_backward(saved=f32(2, 8, 4, 3))),
    "weight channels": ("weight", lambda: conv_backward(weight=f32(8, 3, 3, 3))),
    "int input": ("input", lambda: conv_backward(input=torch.ones(2, 4, 6, 6).long())),
}
for _name, (_expect, _fn) in BACKWARD.items():
    case(f"conv2d_act_backward: {_name}", _expect)(_fn)


@case("Conv2dAct: padding_mode reflect", "padding_mode")
def _():
    mtlcore.nn.Conv2dAct(4, 8, 3, padding_mode="reflect")


@case("Conv2dAct: unknown activation", "activation")
def _():
    mtlcore.nn.Conv2dAct(4, 8, 3, activation="mish")


@case("Conv2dAct: input with other channels", "weight")
def _():
    mtlcore.nn.Conv2dAct(4, 8, 3)(f32(1, 5, 8, 8))


@case("Conv2dAct: unbatched input", "input")
def _():
    mtlcore.nn.Conv2dAct(4, 8, 3)(f32(4, 8, 8))


# --------------------------------------------------------------------------------------------
# max_pool2d (the op, its raw schemas and the MaxPool2d module)
# --------------------------------------------------------------------------------------------


def pool(**overrides):
    args = {"input": f32(2, 3, 8, 8), "kernel_size": 3}
    args.update(overrides)
    return ops.max_pool2d(**args)


POOL = {
    "int input": ("input", lambda: pool(input=torch.ones(2, 3, 8, 8, dtype=torch.int64))),
    "bool input": ("input", lambda: pool(input=torch.ones(2, 3, 8, 8, dtype=torch.bool))),
    "complex input": ("input", lambda: pool(input=f32(2, 3, 8, 8, dtype=torch.complex64))),
    "input rank 2": ("input", lambda: pool(input=f32(8, 8))),
    "input rank 5": ("input", lambda: pool(input=f32(1, 2, 3, 8, 8))),
    "input without rows": ("input", lambda: pool(input=f32(2, 3, 0, 8))),
    "input without rows, padded": (
        "input",
        lambda: pool(input=f32(2, 3, 0, 8), kernel_size=2, padding=1),
    ),
    "input without columns, padded": (
        "input",
        lambda: pool(input=f32(2, 3, 8, 0), kernel_size=2, padding=1),
    ),
    "kernel_size 0": ("kernel_size", lambda: pool(kernel_size=0)),
    "kernel_size negative": ("kernel_size", lambda: pool(kernel_size=(3, -1))),
    "kernel_size three values": ("kernel_size", lambda: pool(kernel_size=(2, 2, 2))),
    "kernel_size float": ("kernel_size", lambda: pool(kernel_size=2.5)),
    "kernel_size nan": ("kernel_size", lambda: pool(kernel_size=math.nan)),
    "kernel_size bool": ("kernel_size", lambda: pool(kernel_size=True)),
    "kernel_size None": ("kernel_size", lambda: pool(kernel_size=None)),
    "kernel_size 2^31": ("kernel_size", lambda: pool(kernel_size=2**31)),
    "kernel_size beyond int64": ("kernel_size", lambda: pool(kernel_size=2**63)),
    "stride 0": ("stride", lambda: pool(stride=0)),
    "stride negative": ("stride", lambda: pool(stride=(1, -1))),
    "stride three values": ("stride", lambda: pool(stride=(1, 1, 1))),
    "stride 2^31": ("stride", lambda: pool(stride=2**31)),
    "padding negative": ("padding", lambda: pool(padding=-1)),
    "padding above half the kernel": ("padding", lambda: pool(padding=2)),
    "padding above half the kernel width": (
        "padding",
        lambda: pool(kernel_size=(4, 2), padding=(2, 2)),
    ),
    "padding three values": ("padding", lambda: pool(padding=(1, 1, 1))),
    "padding float": ("padding", lambda: pool(padding=0.5)),
    "dilation 0": ("dilation", lambda: pool(dilation=0)),
    "dilation negative": ("dilation", lambda: pool(dilation=(1, -2))),
    "dilation 2^31": ("dilation", lambda: pool(dilation=2**31)),
    "output would be empty": ("kernel_size", lambda: pool(kernel_size=9)),
    "dilated window larger than input": ("dilation", lambda: pool(dilation=4)),
    "sparse input": ("input", lambda: pool(input=f32(2, 3, 8, 8).to_sparse())),
    "sparse unbatched input": ("input", lambda: pool(input=f32(3, 8, 8).to_sparse())),
}
for _name, (_expect, _fn) in POOL.items():
    case(f"max_pool2d: {_name}", _expect)(_fn)


@case("max_pool2d: sparse gradient into backward", "grad_output")
def _():
    y = pool(input=f32(2, 3, 8, 8).requires_grad_())
    y.backward(torch.ones_like(y).to_sparse())


@case("max_pool2d: input with a forward-mode tangent", "input")
def _():
    with_tangent(lambda dual: pool(input=dual(f32(2, 3, 8, 8))))


@case("max_pool2d (raw schema): padding three values", "padding")
def _():
    torch.ops.mtlcore.max_pool2d(f32(2, 3, 8, 8), [2, 2], [2, 2], [0, 0, 0], [1, 1], False)


@case("max_pool2d (raw schema): stride one value", "stride")
def _():
    torch.ops.mtlcore.max_pool2d(f32(2, 3, 8, 8), [2, 2], [2], [0, 0], [1, 1], False)


def pool_backward(**overrides):
    args = dict(
        grad_output=f32(2, 3, 4, 4),
        input=f32(2, 3, 8, 8),
        kernel_size=[2, 2],
        stride=[2, 2],
        padding=[0, 0],
        dilation=[1, 1],
        ceil_mode=False,
    )
    args.update(overrides)
    return torch.ops.mtlcore.max_pool2d_backward(*args.values())


POOL_BACKWARD = {
    "grad_output shape": ("grad_output", lambda: pool_backward(grad_output=f32(2, 3, 4, 5))),
    "grad_output rank 3": ("grad_output", lambda: pool_backward(grad_output=f32(3, 4, 4))),
    "grad_output dtype": (
        "grad_output",
        lambda: pool_backward(grad_output=f32(2, 3, 4, 4, dtype=torch.float64)),
    ),
    "int grad_output": (
        "grad_output",
        lambda: pool_backward(grad_output=torch.ones(2, 3, 4, 4, dtype=torch.int64)),
    ),
    "int input": ("input", lambda: pool_backward(input=torch.ones(2, 3, 8, 8).long())),
    "input rank 3": ("input", lambda: pool_backward(input=f32(3, 8, 8))),
    "kernel_size one value": ("kernel_size", lambda: pool_backward(kernel_size=[2])),
    "padding above half the kernel": ("padding", lambda: pool_backward(padding=[1, 2])),
}
for _name, (_expect, _fn) in POOL_BACKWARD.items():
    case(f"max_pool2d_backward: {_name}", _expect)(_fn)


@case("max_pool2d_backward: grad_output on another device", "grad_output", cuda=True)
def _():
    pool_backward(input=f32(2, 3, 8, 8, device="cuda"))


@case("max_pool2d_backward: input on another device", "input", cuda=True)
def _():
    pool_backward(grad_output=f32(2, 3, 4, 4, device="cuda"))


@case("MaxPool2d: return_indices", "return_indices")
def _():
    mtlcore.nn.MaxPool2d(2, return_indices=True)


@case("MaxPool2d: kernel_size 0", "kernel_size")
def _():
    mtlcore.nn.MaxPool2d(0)(f32(2, 3, 8, 8))


@case("MaxPool2d: padding above half the kernel", "padding")
def _():
    mtlcore.nn.MaxPool2d(2, padding=2)(f32(2, 3, 8, 8))


@case("MaxPool2d: input rank 5", "input")
def _():
    mtlcore.nn.MaxPool2d(2)(f32(1, 2, 3, 8, 8))


# --------------------------------------------------------------------------------------------
# multitask_loss (the op, its raw schemas and the MultiTaskLoss module)
# --------------------------------------------------------------------------------------------


def loss(**overrides):
    args = {
        "logits": [f32(4, 3), f32(4, 2), f32(4, 1)],
        "targets": [torch.tensor([0, 1, 2, 1]), torch.rand(4, 2), torch.randn(4, 1)],
        "kinds": ["ce", "bce", "mse"],
    }
    args.update(overrides)
    return ops.multitask_loss(**args)


def one_task(logits, target, kind="ce", **kw):
    return ops.multitask_loss([logits], [target], [kind], **kw)


LOSS = {
    "no task": ("task", lambda: loss(logits=[], targets=[], kinds=[])),
    "fewer targets": ("targets", lambda: loss(targets=[torch.tensor([0, 1, 2, 1])])),
    "fewer kinds": ("kinds", lambda: loss(kinds=["ce", "bce"])),
    "unknown kind": ("kinds[2]", lambda: loss(kinds=["ce", "bce", "huber"])),
    "int logits": (
        "logits[0]",
        lambda: one_task(torch.ones(4, 3, dtype=torch.int64), torch.tensor([0, 1, 2, 1])),
    ),
    "ce logits rank 1": ("logits[0]", lambda: one_task(f32(4), torch.tensor([0, 1, 2, 1]))),
    "ce float targets": ("targets[0]", lambda: one_task(f32(4, 3), torch.rand(4))),
    "ce target batch": ("targets[0]", lambda: one_task(f32(4, 3), torch.tensor([0, 1, 2]))),
    "ce target rank": ("targets[0]", lambda: one_task(f32(4, 3), torch.zeros(4, 1).long())),
    "ce dense target shape": (
        "targets[0]",
        lambda: one_task(f32(2, 3, 4, 4), torch.zeros(2, 4, 5).long()),
    ),
    "ce label above range": ("targets[0]", lambda: one_task(f32(4, 3), torch.tensor([0, 1, 3, 1]))),
    "ce label far above range": (
        "targets[0]",
        lambda: one_task(f32(4, 3), torch.tensor([0, 1, 2**40, 1])),
    ),
    "ce negative label": ("targets[0]", lambda: one_task(f32(4, 3), torch.tensor([0, -1, 2, 1]))),
    "ce label int64 min": (
        "targets[0]",
        lambda: one_task(f32(4, 3), torch.tensor([0, -(2**63), 2, 1])),
    ),
    "bce target shape": ("targets[0]", lambda: one_task(f32(4, 2), torch.rand(4, 3), "bce")),
    "mse target shape": ("targets[0]", lambda: one_task(f32(4, 2), torch.rand(2, 4), "mse")),
    "l1 int targets": ("targets[0]", lambda: one_task(f32(4, 2), torch.ones(4, 2).long(), "l1")),
    "weights length": ("weights", lambda: loss(weights=torch.ones(2))),
    "weights rank": ("weights", lambda: loss(weights=torch.ones(3, 1))),
    "int weights": ("weights", lambda: loss(weights=torch.ones(3, dtype=torch.int64))),
    "relation shape": ("relation", lambda: loss(relation=torch.zeros(3, 2))),
    "relation vector": ("relation", lambda: loss(relation=torch.zeros(9))),
    "int relation": ("relation", lambda: loss(relation=torch.zeros(3, 3, dtype=torch.int32))),
    "label_smoothing nan": ("label_smoothing", lambda: loss(label_smoothing=math.nan)),
    "label_smoothing negative": ("label_smoothing", lambda: loss(label_smoothing=-0.1)),
    "label_smoothing above 1": ("label_smoothing", lambda: loss(label_smoothing=1.5)),
    "sparse logits": (
        "logits[0]",
        lambda: one_task(f32(4, 3).to_sparse(), torch.tensor([0, 1, 2, 1])),
    ),
    "logits not tensors": ("logits", lambda: loss(logits=[1.0, 2.0, 3.0])),
}
for _name, (_expect, _fn) in LOSS.items():
    case(f"multitask_loss: {_name}", _expect)(_fn)


@case("multitask_loss: logits with a forward-mode tangent", "logits[1]")
def _():
    with_tangent(lambda dual: loss(logits=[f32(4, 3), dual(f32(4, 2)), f32(4, 1)]))


@case("multitask_loss: relation with a forward-mode tangent", "relation")
def _():
    with_tangent(lambda dual: loss(relation=dual(torch.rand(3, 3))))


@case("multitask_loss: targets on another device", "targets[0]", cuda=True)
def _():
    one_task(f32(4, 3, device="cuda"), torch.tensor([0, 1, 2, 1]))


@case("multitask_loss: tasks on two devices", "logits[1]", cuda=True)
def _():
    loss(logits=[f32(4, 3), f32(4, 2, device="cuda"), f32(4, 1)])


@case("multitask_loss: weights on another device", "weights", cuda=True)
def _():
    loss(weights=torch.ones(3, device="cuda"))


@case("multitask_loss_backward: grad_logits count", "grad_logits")
def _():
    _, per_task, scale, grads = torch.ops.mtlcore.multitask_loss_with_grad(
        [f32(4, 3)], [torch.tensor([0, 1, 2, 1])], ["ce"], None, None, -100, 0.0
    )
    torch.ops.mtlcore.multitask_loss_backward(
        torch.ones(()),
        torch.ones(1),
        [*grads, *grads],
        scale,
        per_task,
        None,
        None,
        [True, False, False],
    )


@case("MultiTaskLoss: unknown kind", "kind")
def _():
    mtlcore.nn.MultiTaskLoss({"a": "ce", "b": "hinge"})


@case("MultiTaskLoss: weights length", "weights")
def _():
    mtlcore.nn.MultiTaskLoss({"a": "ce", "b": "mse"}, weights=[1.0, 2.0, 3.0])


@case("MultiTaskLoss: relation shape", "relation")
def _():
    mtlcore.nn.MultiTaskLoss({"a": "ce", "b": "mse"}, relation=[[0.0, 1.0]])


@case("MultiTaskLoss: unknown learnable", "learnable")
def _():
    mtlcore.nn.MultiTaskLoss({"a": "ce"}, learnable="weights")


@case("MultiTaskLoss: negative relation_decay", "relation_decay")
def _():
    mtlcore.nn.MultiTaskLoss({"a": "ce"}, relation_decay=-1.0)


@case("MultiTaskLoss: output missing", "outputs")
def _():
    m = mtlcore.nn.MultiTaskLoss({"a": "ce", "b": "mse"})
    m({"a": f32(2, 3)}, {"a": torch.tensor([0, 1]), "b": f32(2, 1)})


@case("MultiTaskLoss: target missing", "targets")
def _():
    m = mtlcore.nn.MultiTaskLoss({"a": "ce", "b": "mse"})
    m({"a": f32(2, 3), "b": f32(2, 1)}, {"a": torch.tensor([0, 1])})


# --------------------------------------------------------------------------------------------
# sgd_ / adam_ (the ops) and the SGD / Adam / AdamW optimizers
# --------------------------------------------------------------------------------------------


def sgd(params=None, grads=None, bufs=None, **kw):
    params = [f32(5), f32(3, 2)] if params is None else params
    grads = [torch.randn_like(p) for p in params] if grads is None else grads
    bufs = [] if bufs is None else bufs
    kw.setdefault("lr", 0.1)
    return ops.sgd_(params, grads, bufs, **kw)


def adam(params=None, grads=None, m=None, v=None, vmax=None, steps=None, **kw):
    params = [f32(5), f32(3, 2)] if params is None else params
    like = [torch.zeros_like(p) for p in params]
    grads = [torch.randn_like(p) for p in params] if grads is None else grads
    m = [t.clone() for t in like] if m is None else m
    v = [t.clone() for t in like] if v is None else v
    vmax = [] if vmax is None else vmax
    steps = [torch.tensor(1.0) for _ in params] if steps is None else steps
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    hyper.update(kw)
    return ops.adam_(params, grads, m, v, vmax, steps, **hyper)


def _aliased_pair():
    p = f32(6)
    return [p], [p]


def _overlapping_params():
    base = f32(10)
    return [base[:6], base[4:]]


OPTIM = {
    "sgd_: fewer grads": ("grads", lambda: sgd(grads=[f32(5)])),
    "sgd_: grad shape": ("grads[1]", lambda: sgd(grads=[f32(5), f32(2, 3)])),
    "sgd_: grad dtype": ("grads[0]", lambda: sgd(grads=[f32(5, dtype=torch.float64), f32(3, 2)])),
    "sgd_: int params": (
        "params[0]",
        lambda: sgd(params=[torch.ones(5, dtype=torch.int32)], grads=[torch.ones(5).int()]),
    ),
    "sgd_: half params on cpu": (
        "params[0]",
        lambda: sgd(params=[f32(5, dtype=torch.float16)], grads=[f32(5, dtype=torch.float16)]),
    ),
    "sgd_: params of two dtypes": (
        "params[1]",
        lambda: sgd(
            params=[f32(5), f32(5, dtype=torch.float64)],
            grads=[f32(5), f32(5, dtype=torch.float64)],
        ),
    ),
    "sgd_: lr nan": ("lr", lambda: sgd(lr=math.nan)),
    "sgd_: lr negative": ("lr", lambda: sgd(lr=-0.1)),
    "sgd_: lr inf": ("lr", lambda: sgd(lr=math.inf)),
    "sgd_: lr tensor of two values": ("lr", lambda: sgd(lr=torch.tensor([0.1, 0.2]))),
    "sgd_: momentum negative": ("momentum", lambda: sgd(momentum=-0.5, bufs=[f32(5), f32(3, 2)])),
    "sgd_: momentum nan": ("momentum", lambda: sgd(momentum=math.nan)),
    "sgd_: dampening inf": ("dampening", lambda: sgd(dampening=math.inf)),
    "sgd_: weight_decay nan": ("weight_decay", lambda: sgd(weight_decay=math.nan)),
    "sgd_: weight_decay negative": ("weight_decay", lambda: sgd(weight_decay=-1.0)),
    "sgd_: nesterov without momentum": ("nesterov", lambda: sgd(nesterov=True)),
    "sgd_: nesterov with dampening": (
        "nesterov",
        lambda: sgd(nesterov=True, momentum=0.9, dampening=0.1, bufs=[f32(5), f32(3, 2)]),
    ),
    "sgd_: momentum without buffers": ("momentum_buffers", lambda: sgd(momentum=0.9)),
    "sgd_: buffer shape": (
        "momentum_buffers[1]",
        lambda: sgd(momentum=0.9, bufs=[f32(5), f32(6)]),
    ),
    "sgd_: expanded param": (
        "params[0]",
        lambda: sgd(params=[f32(1).expand(5)], grads=[f32(5)]),
    ),
    "sgd_: param aliases its grad": ("params[0]", lambda: sgd(*_aliased_pair())),
    "sgd_: buffer aliases its param": (
        "momentum_buffers[0]",
        lambda: (lambda p: sgd(params=[p], grads=[f32(4)], bufs=[p], momentum=0.9))(f32(4)),
    ),
    "sgd_: one tensor twice in params": (
        "params[1]",
        lambda: (lambda p: sgd(params=[p, p], grads=[f32(4), f32(4)]))(f32(4)),
    ),
    "sgd_: overlapping params": (
        "params[1]",
        lambda: sgd(params=_overlapping_params(), grads=[f32(6), f32(6)]),
    ),
    "sgd_: grad_scale float64": (
        "grad_scale",
        lambda: sgd(grad_scale=torch.ones(1, dtype=torch.float64)),
    ),
    "sgd_: grad_scale two values": ("grad_scale", lambda: sgd(grad_scale=torch.ones(2))),
    "sgd_: found_inf int": ("found_inf", lambda: sgd(found_inf=torch.zeros(1, dtype=torch.int32))),
    "sgd_: sparse grad": (
        "grads[0]",
        lambda: sgd(params=[f32(5)], grads=[f32(5).to_sparse()]),
    ),
    "adam_: beta1 one": ("beta1", lambda: adam(beta1=1.0)),
    "adam_: beta1 negative": ("beta1", lambda: adam(beta1=-0.1)),
    "adam_: beta2 nan": ("beta2", lambda: adam(beta2=math.nan)),
    "adam_: beta2 above one": ("beta2", lambda: adam(beta2=1.5)),
    "adam_: eps nan": ("eps", lambda: adam(eps=math.nan)),
    "adam_: eps negative": ("eps", lambda: adam(eps=-1e-8)),
    "adam_: lr nan": ("lr", lambda: adam(lr=math.nan)),
    "adam_: weight_decay inf": ("weight_decay", lambda: adam(weight_decay=math.inf)),
    "adam_: fewer exp_avgs": ("exp_avgs", lambda: adam(m=[f32(5)])),
    "adam_: exp_avg_sq shape": ("exp_avg_sqs[1]", lambda: adam(v=[f32(5), f32(2, 3)])),
    "adam_: exp_avg dtype": (
        "exp_avgs[0]",
        lambda: adam(m=[f32(5, dtype=torch.float64), f32(3, 2)]),
    ),
    "adam_: amsgrad without max_exp_avg_sqs": ("max_exp_avg_sqs", lambda: adam(amsgrad=True)),
    "adam_: fewer state_steps": ("state_steps", lambda: adam(steps=[torch.tensor(1.0)])),
    "adam_: int state_steps": (
        "state_steps[0]",
        lambda: adam(steps=[torch.tensor(1), torch.tensor(1)]),
    ),
    "adam_: state_step two values": (
        "state_steps[1]",
        lambda: adam(steps=[torch.tensor(1.0), torch.ones(2)]),
    ),
    "adam_: state_step zero": (
        "state_steps[1]",
        lambda: adam(steps=[torch.tensor(1.0), torch.tensor(0.0)]),
    ),
    "adam_: state_step nan": (
        "state_steps[0]",
        lambda: adam(steps=[torch.tensor(math.nan), torch.tensor(1.0)]),
    ),
    "adam_: exp_avg aliases its param": (
        "exp_avgs[0]",
        lambda: (lambda p: adam(params=[p], m=[p]))(f32(5)),
    ),
    "adam_: exp_avg_sq aliases its exp_avg": (
        "exp_avg_sqs[0]",
        lambda: (lambda t: adam(params=[f32(5)], m=[t], v=[t]))(f32(5)),
    ),
    "adam_: one tensor twice in params": (
        "params[1]",
        lambda: (lambda p: adam(params=[p, p]))(f32(4)),
    ),
    "adam_: expanded exp_avg": ("exp_avgs[0]", lambda: adam(params=[f32(5)], m=[f32(1).expand(5)])),
}
for _name, (_expect, _fn) in OPTIM.items():
    case(_name, _expect)(_fn)


@case("sgd_: grad on another device", "grads[0]", cuda=True)
def _():
    sgd(params=[f32(5)], grads=[f32(5, device="cuda")])


@case("adam_: state_steps on another device is fine, exp_avg is not", "exp_avgs[0]", cuda=True)
def _():
    p = f32(5, device="cuda")
    adam(params=[p], grads=[torch.randn_like(p)], m=[f32(5)], v=[torch.zeros_like(p)])


def _model():
    return nn.Linear(3, 2)


OPTIMIZERS = {
    "SGD: lr negative": (
        "learning rate",
        lambda: mtlcore.optim.SGD(_model().parameters(), lr=-1.0),
    ),
    "SGD: momentum negative": (
        "momentum",
        lambda: mtlcore.optim.SGD(_model().parameters(), lr=0.1, momentum=-0.1),
    ),
    "SGD: nesterov without momentum": (
        "esterov",
        lambda: mtlcore.optim.SGD(_model().parameters(), lr=0.1, nesterov=True),
    ),
    "Adam: betas out of range": (
        "beta",
        lambda: mtlcore.optim.Adam(_model().parameters(), betas=(1.0, 0.999)),
    ),
    "Adam: eps negative": ("eps", lambda: mtlcore.optim.Adam(_model().parameters(), eps=-1.0)),
    "Adam: differentiable": (
        "differentiable",
        lambda: mtlcore.optim.Adam(_model().parameters(), differentiable=True),
    ),
    "AdamW: weight_decay negative": (
        "weight_decay",
        lambda: mtlcore.optim.AdamW(_model().parameters(), weight_decay=-0.1),
    ),
}
for _name, (_expect, _fn) in OPTIMIZERS.items():
    case(_name, _expect)(_fn)


@case("SGD: sparse gradient", "sparse")
def _():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = mtlcore.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


@case("Adam: sparse gradient", "sparse")
def _():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = mtlcore.optim.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()


@case("Adam: complex parameter", "params[0]")
def _():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = mtlcore.optim.Adam([p])
    p.grad = torch.randn_like(p)
    opt.step()


# --------------------------------------------------------------------------------------------
# Models, tasks, weighting and relations
# --------------------------------------------------------------------------------------------


@case("MultiTaskModel: no head", "head")
def _():
    mtlcore.nn.MultiTaskModel(nn.Linear(3, 3), {})


@case("MultiTaskModel: dense head on a trunk without features()", "feature")
def _():
    mtlcore.nn.MultiTaskModel(nn.Linear(3, 3), {"seg": mtlcore.nn.DenseHead(3, 2, 8)})


@case("GroupedModel: a task in no group", "groups")
def _():
    heads = {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}
    mtlcore.nn.GroupedModel(lambda: nn.Linear(3, 3), heads, [["a"]])


@case("GroupedModel: a task in two groups", "groups")
def _():
    heads = {"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)}
    mtlcore.nn.GroupedModel(lambda: nn.Linear(3, 3), heads, [["a", "b"], ["b"]])


@case("Task: unknown kind", "kind")
def _():
    mtlcore.Task("a", "hinge", 3)


@case("Task: no outputs", "num_outputs")
def _():
    mtlcore.Task("a", "ce", 0)


@case("weighting.get: unknown name", "weighting")
def _():
    mtlcore.weighting.get("softmax", 3)


@case("weighting: zero tasks", "num_tasks")
def _():
    mtlcore.weighting.get("equal", 0)


@case("weighting: fixed weights length", "weights")
def _():
    mtlcore.weighting.get("fixed", 3, weights=[1.0, 2.0])


@case("weighting: fixed weights nan", "weights")
def _():
    mtlcore.weighting.get("fixed", 2, weights=[1.0, math.nan])


@case("weighting: cagrad negative c", "c")
def _():
    mtlcore.weighting.get("cagrad", 2, c=-0.5)


@case("relations.group_tasks: affinity not square", "affinity")
def _():
    mtlcore.relations.group_tasks(torch.zeros(3, 2), 2)


@case("relations.group_tasks: too many groups", "num_groups")
def _():
    mtlcore.relations.group_tasks(torch.zeros(3, 3), 4)


@case("relations.group_tasks: zero groups", "num_groups")
def _():
    mtlcore.relations.group_tasks(torch.zeros(3, 3), 0)


# --------------------------------------------------------------------------------------------
# The CPU output cache
# --------------------------------------------------------------------------------------------


@case("set_cpu_cache_limit: negative", "nbytes")
def _():
    mtlcore.set_cpu_cache_limit(-1)


@case("set_cpu_cache_limit: float", "nbytes")
def _():
    mtlcore.set_cpu_cache_limit(1.5)


@case("set_cpu_cache_limit: bool", "nbytes")
def _():
    mtlcore.set_cpu_cache_limit(True)


@case("set_cpu_cache_limit: NaN", "nbytes")
def _():
    mtlcore.set_cpu_cache_limit(math.nan)


# --------------------------------------------------------------------------------------------
# Not part of the table: cases that check the runner itself (tests/test_bad_input.py).
# --------------------------------------------------------------------------------------------


def _segfault():
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def _silent():
    return None


RUNNER_CHECKS: dict[str, Case] = {
    "crash": Case("crash", "", _ERRORS, _segfault),
    "silent": Case("silent", "", _ERRORS, _silent),
}
