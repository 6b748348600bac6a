"""mtlcore.ops.conv2d_act against F.conv2d + the activation and mtlcore.reference; gradcheck,
opcheck, torch.compile, autocast, the Conv2dAct module, fuse(), and bad input."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA,
    CompiledOnce,
    assert_double_backward_raises,
    assert_nested_func_grad_raises,
)
from torch import nn

from mtlcore import nn as mnn
from mtlcore import ops, reference

ACTIVATIONS = ops.ACTIVATIONS
FUNCTIONAL = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
SLOPE = 0.1


@pytest.fixture(autouse=True)
def exact_fp32_on_cuda():
    """fp32 comparisons need fp32 math: cuDNN's (and ours) TF32 mode would round inputs."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def quantized(shape, gen, device, dtype=torch.float32):
    """Values k / 16 in [-1, 1]: products and sums of a small conv are exact in fp32, so both
    sides see the very same pre-activation (relu's kink cannot flip between them)."""
    return (torch.randint(-16, 17, shape, generator=gen) / 16).to(device=device, dtype=dtype)


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as a contiguous, channels_last or non-contiguous (strided view) tensor, same values."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def assert_close(actual, expected, rtol=1e-4, what=""):
    """Relative to the tensor's scale: |a - e| <= rtol * (|e| + max|e|)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), msg=lambda m: f"{what}: {m}"
    )


def fits(h, w, k, padding, dilation):
    if padding == "same":
        return True
    return dilation * (k - 1) + 1 <= min(h, w) + 2 * padding


# (N, C per group, H, W): 1x1 images, 7x5 images, 1 and 3 channels, batch 1 and 13.
SIZES = [(1, 1, 1, 1), (13, 3, 7, 5), (1, 3, 5, 7), (13, 1, 6, 6)]
STRIDES = (1, 2)
PADDINGS = (0, 1, "same")
DILATIONS = (1, 2)
GROUPS = (1, 2, "depthwise")


def grid():
    """Every stride x padding x dilation x groups x size that F.conv2d accepts."""
    for stride, padding, dilation, groups, size in itertools.product(
        STRIDES, PADDINGS, DILATIONS, GROUPS, SIZES
    ):
        n, c, h, w = size
        if padding == "same" and stride != 1:
            continue
        if not fits(h, w, 3, padding, dilation):
            continue
        if groups == "depthwise":
            cin, g, k = c, c, 2 * c
        else:
            cin, g, k = c * groups, groups, 3 * groups
        yield n, cin, h, w, k, stride, padding, dilation, g


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_functional_and_reference(device, activation, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{activation}-{kind}".encode()))
    count = 0
    for n, cin, h, w, k, stride, padding, dilation, groups in grid():
        what = f"{activation} {kind} N={n} C={cin} {h}x{w} K={k} s={stride} p={padding} "
        what += f"d={dilation} g={groups}"
        x = layout(quantized((n, cin, h, w), gen, device), kind).requires_grad_()
        weight = quantized((k, cin // groups, 3, 3), gen, device).requires_grad_()
        bias = quantized((k,), gen, device).requires_grad_()
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        out = ops.conv2d_act(x, weight, bias, **conv, activation=activation, negative_slope=SLOPE)
        ref = reference.conv2d_act(
            x, weight, bias, **conv, activation=activation, negative_slope=SLOPE
        )
        functional = FUNCTIONAL[activation](F.conv2d(x, weight, bias, **conv))
        assert out.shape == ref.shape and out.is_contiguous(), what
        assert_close(out, ref, what=what + " output")
        assert_close(out, functional, what=what + " output vs F")
        grad = torch.randn(out.shape, generator=gen).to(device)
        got = torch.autograd.grad(out, (x, weight, bias), grad)
        want = torch.autograd.grad(ref, (x, weight, bias), grad)
        for name, a, b in zip(("input", "weight", "bias"), got, want, strict=True):
            assert_close(a, b, what=f"{what} grad_{name}")
        # Without the input gradient (a first layer), the CPU computes G inside the
        # weight-gradient pass instead of in a pass of its own.
        out = ops.conv2d_act(
            x.detach(), weight, bias, **conv, activation=activation, negative_slope=SLOPE
        )
        got = torch.autograd.grad(out, (weight, bias), grad)
        for name, a, b in zip(("weight", "bias"), got, want[1:], strict=True):
            assert_close(a, b, what=f"{what} grad_{name} without grad_input")
        count += 1
    assert count > 100


@pytest.mark.parametrize("kernel", [(1, 1), (2, 3), (5, 4)])
@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
def test_kernel_shapes_and_same_padding(device, kernel, activation):
    """Even kernels with padding='same' pad one more at the bottom/right, as F.conv2d does."""
    gen = torch.Generator().manual_seed(1)
    for padding, dilation in [("same", 1), ("same", 2), ("valid", 1), ((2, 1), 1)]:
        x = quantized((3, 4, 9, 8), gen, device).requires_grad_()
        weight = quantized((5, 4, *kernel), gen, device).requires_grad_()
        out = ops.conv2d_act(x, weight, None, 1, padding, dilation, activation=activation)
        ref = reference.conv2d_act(x, weight, None, 1, padding, dilation, activation=activation)
        what = f"{kernel} {padding} d={dilation}"
        assert_close(out, ref, what=what)
        grad = torch.randn(out.shape, generator=gen).to(device)
        for a, b in zip(
            torch.autograd.grad(out, (x, weight), grad),
            torch.autograd.grad(ref, (x, weight), grad),
            strict=True,
        ):
            assert_close(a, b, what=what)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gaussian_inputs_and_larger_layers(device, activation):
    """Random (not quantized) data through layers deep enough to need several depth blocks,
    some with output rows a little wider than one CPU tile (whose last tile then starts early
    in the row and recomputes pixels of the tile before it)."""
    gen = torch.Generator().manual_seed(2)
    for n, c, h, k, padding, groups in [
        (2, 64, 12, 40, 1, 1),
        (3, 300, 5, 7, 0, 1),
        (2, 32, 9, 32, 1, 4),
        (2, 20, 21, 24, 1, 1),  # 21-pixel rows, 180 depth rows (216 for the input gradient)
        (2, 16, 19, 20, 0, 1),  # 17-pixel rows, valid
    ]:
        x = torch.randn(n, c, h, h, generator=gen).to(device).requires_grad_()
        weight = torch.randn(k, c // groups, 3, 3, generator=gen) / (c * 9 / groups) ** 0.5
        weight = weight.to(device).requires_grad_()
        bias = torch.randn(k, generator=gen).to(device).requires_grad_()
        out = ops.conv2d_act(x, weight, bias, 1, padding, 1, groups, activation, SLOPE)
        ref = reference.conv2d_act(x, weight, bias, 1, padding, 1, groups, activation, SLOPE)
        assert_close(out, ref, what=f"{activation} C={c}")
        grad = torch.randn(out.shape, generator=gen).to(device)
        got = torch.autograd.grad(out, (x, weight, bias), grad)
        want = torch.autograd.grad(ref, (x, weight, bias), grad)
        for name, a, b in zip(("input", "weight", "bias"), got, want, strict=True):
            # relu/leaky_relu masks may flip where the two sums round differently near zero.
            rtol = 2e-3 if activation in ("relu", "leaky_relu") else 1e-4
            assert_close(a, b, rtol=rtol, what=f"{activation} C={c} grad_{name}")


def grad_layouts(shape, gen, device):
    """grad_output as autograd may hand it over: contiguous, channels_last, a strided view and
    an expanded scalar (every stride 0, as from out.sum())."""
    g = torch.randn(shape, generator=gen).to(device)
    yield "contiguous", g
    yield "channels_last", g.contiguous(memory_format=torch.channels_last)
    yield "strided", layout(g, "strided")
    yield "expanded", torch.full((), 0.75, device=device).expand(shape)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weight_gradient_without_the_input_gradient(device, activation):
    """grad_weight and grad_bias when the input needs no gradient (the CPU computes G inside
    the weight-gradient pass up to 64 depth rows per group), against the reference: batches
    that split unevenly, images of several pixel chunks, groups, depthwise, deep layers (G in
    memory), every layout of grad_output."""
    gen = torch.Generator().manual_seed(zlib.crc32(activation.encode()))
    for n, c, h, w, k, conv in [
        (13, 3, 20, 21, 32, {}),  # 13 images over 8 splits, 399 pixels: two chunks each
        (9, 3, 32, 32, 16, {"padding": 1}),
        (3, 7, 9, 6, 5, {"stride": 2, "dilation": 2, "padding": 2}),
        (5, 8, 7, 7, 6, {"groups": 2, "padding": 1}),
        (4, 16, 6, 5, 16, {"groups": 16, "padding": 1}),  # depthwise
        (3, 9, 6, 6, 4, {}),  # 81 depth rows: G in memory, as with the input gradient
    ]:
        x = torch.randn(n, c, h, w, generator=gen).to(device)
        weight = torch.randn(k, c // conv.get("groups", 1), 3, 3, generator=gen).to(device)
        weight.requires_grad_()
        bias = torch.randn(k, generator=gen).to(device).requires_grad_()
        out = ops.conv2d_act(x, weight, bias, **conv, activation=activation, negative_slope=SLOPE)
        ref = reference.conv2d_act(
            x, weight, bias, **conv, activation=activation, negative_slope=SLOPE
        )
        for kind, grad in grad_layouts(out.shape, gen, device):
            what = f"{activation} N={n} C={c} {h}x{w} K={k} {conv} grad {kind}"
            got = torch.autograd.grad(out, (weight, bias), grad, retain_graph=True)
            want = torch.autograd.grad(ref, (weight, bias), grad, retain_graph=True)
            for name, a, b in zip(("weight", "bias"), got, want, strict=True):
                rtol = 2e-3 if activation in ("relu", "leaky_relu") else 1e-4
                assert_close(a, b, rtol=rtol, what=f"{what} grad_{name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_from_g_in_the_padded_layout(device, activation):
    """Unit-stride layers whose input gradient is a direct convolution of G and whose output
    channels fill the vectors: the CPU's first backward pass writes G straight into the
    zero-padded layout that the input gradient reads in place, and the weight gradient
    transposes it from there row by row. Every layout of grad_output, the input gradient alone,
    with the weight gradient, and with the bias gradient too, against the reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(b"padded G " + activation.encode()))
    for n, c, h, w, k, conv in [
        (3, 8, 7, 9, 32, {"padding": 1}),
        (2, 6, 9, 8, 64, {"padding": "same", "dilation": 2, "groups": 2}),
        (1, 5, 6, 7, 32, {"padding": (0, 1)}),  # one image: direct despite the wide border
    ]:
        x = torch.randn(n, c, h, w, generator=gen).to(device)
        groups = conv.get("groups", 1)
        weight = (torch.randn(k, c // groups, 3, 3, generator=gen) / (c * 9) ** 0.5).to(device)
        bias = torch.randn(k, generator=gen).to(device)
        for count in (1, 2, 3):  # x; x and weight; x, weight and bias
            wanted = [t.detach().requires_grad_() for t in (x, weight, bias)[:count]]
            args = [*wanted, *(x, weight, bias)[count:]]
            out = ops.conv2d_act(*args, **conv, activation=activation, negative_slope=SLOPE)
            ref = reference.conv2d_act(*args, **conv, activation=activation, negative_slope=SLOPE)
            for kind, grad in grad_layouts(out.shape, gen, device):
                got = torch.autograd.grad(out, wanted, grad, retain_graph=True)
                want = torch.autograd.grad(ref, wanted, grad, retain_graph=True)
                for name, a, b in zip(("input", "weight", "bias"), got, want, strict=False):
                    rtol = 2e-3 if activation in ("relu", "leaky_relu") else 1e-4
                    what = f"{activation} N={n} C={c} K={k} {conv} {count} grads, {kind} grad"
                    assert_close(a, b, rtol=rtol, what=f"{what}: grad_{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weight_gradient_of_wide_layers(device, dtype):
    """Layers with 32 or 64 output channels per group, which fill whole vectors of G^T on every
    CPU path (the direct weight gradient, reading the padded input in place): strides,
    dilation, padding, groups, channels_last and strided inputs, batches of 1 (split into
    depth bands) and 13 (uneven image splits), images of several chunks of output rows (300-pixel
    rows: one row per chunk),
    against the reference, with and without the input gradient."""
    gen = torch.Generator().manual_seed(11)
    for n, c, h, w, k, conv, kind in [
        (13, 16, 9, 8, 64, {"padding": 1}, "contiguous"),
        (1, 40, 7, 7, 32, {}, "channels_last"),
        (3, 12, 11, 10, 64, {"stride": 2, "dilation": 2, "padding": 2}, "strided"),
        (4, 16, 8, 9, 64, {"groups": 2, "padding": "same"}, "contiguous"),
        (2, 3, 5, 302, 32, {"padding": (0, 1)}, "contiguous"),
        (2, 8, 45, 10, 32, {"padding": 1}, "contiguous"),  # 45 rows of 10: chunks of 25 + 20
        (5, 8, 6, 6, 33, {"padding": 1, "stride": (1, 2)}, "channels_last"),
    ]:
        x = layout(torch.randn(n, c, h, w, generator=gen, dtype=dtype), kind).to(device)
        groups = conv.get("groups", 1)
        weight = torch.randn(k, c // groups, 3, 3, generator=gen, dtype=dtype) / (c * 9) ** 0.5
        bias = torch.randn(k, generator=gen, dtype=dtype)
        weight, bias = (t.to(device).requires_grad_() for t in (weight, bias))
        for input_grad in (True, False):
            xs = x.detach().requires_grad_(input_grad)
            wanted = (xs, weight, bias) if input_grad else (weight, bias)
            out = ops.conv2d_act(xs, weight, bias, **conv, activation="silu")
            ref = reference.conv2d_act(xs, weight, bias, **conv, activation="silu")
            grad = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
            got = torch.autograd.grad(out, wanted, grad)
            want = torch.autograd.grad(ref, wanted, grad)
            rtol = 1e-4 if dtype == torch.float32 else 1e-12
            for a, b in zip(got, want, strict=True):
                assert_close(a, b, rtol=rtol, what=f"N={n} C={c} K={k} {conv} {kind} {dtype}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(device, activation):
    gen = torch.Generator().manual_seed(3)
    # The CPU input gradient's three paths: the direct convolution of the padded gradient
    # (unit strides, little border), gathered panels (strided, fewer than 4 image-group jobs),
    # and columns + col2im (strided or mostly border, at least 4 jobs: the last two cases).
    cases = [
        (1, 1, 1, 1, 1),
        (2, 0, 2, 2, 1),
        (1, "same", 1, 4, 1),
        (2, 1, 1, 2, 2),
        (1, 0, 1, 1, 4),
    ]
    for stride, padding, dilation, groups, batch in cases:
        x = torch.randn(batch, 4, 6, 5, generator=gen, dtype=torch.float64).to(device)
        weight = torch.randn(4, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)
        bias = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
        args = [t.requires_grad_() for t in (x, weight.to(device), bias)]

        def f(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups):
            return ops.conv2d_act(x, w, b, stride, padding, dilation, groups, activation, SLOPE)

        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("groups", [1, 2])
def test_gradcheck_float64_wide_layer(device, groups):
    """16 output channels per group fill the float64 vectors of every ISA, so the CPU weight
    gradient takes its direct kernel (G transposed into channel panels, X read in place)."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(2, 2 * groups, 5, 6, generator=gen, dtype=torch.float64).to(device)
    weight = torch.randn(16 * groups, 2, 3, 3, generator=gen, dtype=torch.float64).to(device)
    bias = torch.randn(16 * groups, generator=gen, dtype=torch.float64).to(device)
    args = [t.requires_grad_() for t in (x, weight, bias)]
    stride, padding, dilation = (1, 1, 1) if groups == 1 else ((2, 1), 2, (1, 2))

    def f(x, w, b):
        return ops.conv2d_act(x, w, b, stride, padding, dilation, groups, "silu")

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_double_backward_raises(device, activation):
    """Through the C++ graph node (conv2d_act) and the Python registration of
    conv2d_act_with_preact (gelu keeps the pre-activation)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    out = ops.conv2d_act(x * 1.5, w, b, padding=1, activation=activation)
    assert_double_backward_raises(out.sum(), [x, w, b], "conv2d_act")
    out, _ = torch.ops.mtlcore.conv2d_act_with_preact(
        x * 1.5, w, b, [1, 1], [1, 1], [1, 1], 1, activation, 0.0
    )
    assert_double_backward_raises(out.sum(), [x, w, b], "conv2d_act")
    assert_nested_func_grad_raises(
        lambda w: ops.conv2d_act(x, w, b, activation=activation).sum(), w.detach(), "conv2d_act"
    )


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_torch_func_grad_and_jacrev(device):
    """torch.func's reverse-mode transforms run through the graph node (jacrev: under vmap,
    the backward op through PyTorch's batching fallback)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(device)

    def ours(w):
        return ops.conv2d_act(x, w, activation="tanh")

    def theirs(w):
        return torch.tanh(F.conv2d(x, w))

    assert_close(torch.func.jacrev(ours)(w), torch.func.jacrev(theirs)(w), rtol=1e-12)
    grad = torch.func.grad(lambda w: ours(w).sum())(w)
    assert_close(grad, torch.func.grad(lambda w: theirs(w).sum())(w), rtol=1e-12)


def test_forward_mode_ad_raises(device):
    """A tangent is never silently dropped: forward-mode AD has no formula here, and any
    argument that carries one raises NotImplementedError naming it."""
    import torch.autograd.forward_ad as fwad

    x, w, b = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    x, w, b = x.to(device), w.to(device), b.to(device)
    with fwad.dual_level():
        for name in ["input", "weight", "bias"]:
            args = {"input": x, "weight": w, "bias": b}
            args[name] = fwad.make_dual(args[name], torch.ones_like(args[name]))
            match = f"forward-mode AD is not supported: {name} is a dual tensor"
            with pytest.raises(NotImplementedError, match="mtlcore.conv2d_act: " + match):
                ops.conv2d_act(**args)
            with pytest.raises(NotImplementedError, match="with_preact: " + match):
                torch.ops.mtlcore.conv2d_act_with_preact(
                    args["input"],
                    args["weight"],
                    args["bias"],
                    [1, 1],
                    [0, 0],
                    [1, 1],
                    1,
                    "gelu",
                    0.0,
                )
    with pytest.raises(NotImplementedError, match="input is a dual tensor"):
        torch.func.jvp(lambda x: ops.conv2d_act(x, w), (x,), (torch.ones_like(x),))


def test_negative_leaky_slope_saves_the_preactivation(device):
    """With a negative slope the output no longer tells the sign of z; the op keeps z."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: ops.conv2d_act(x, w, activation="leaky_relu", negative_slope=-0.3), (x, w)
    )


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_direct_op_call_is_differentiable(device, activation):
    """torch.ops.mtlcore.conv2d_act itself has autograd (in C++; gelu keeps its pre-activation)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(device).requires_grad_()

    def f(x, w, b):
        return torch.ops.mtlcore.conv2d_act(x, w, b, [1, 1], [1, 1], [1, 1], 1, activation, 0.0)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_only_needed_gradients_are_computed(device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 7, 7, generator=gen).to(device)
    w = torch.randn(5, 3, 3, 3, generator=gen).to(device).requires_grad_()
    out = ops.conv2d_act(x, w, None, activation="silu")
    (gw,) = torch.autograd.grad(out.sum(), (w,))
    ref = reference.conv2d_act(x, w, None, activation="silu")
    assert_close(gw, torch.autograd.grad(ref.sum(), (w,))[0])
    gi, gw, gb = torch.ops.mtlcore.conv2d_act_backward(
        torch.ones_like(out),
        x,
        w,
        out,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
        "relu",
        0.0,
        [False, True, False],
    )
    assert gi.numel() == 0 and gb.numel() == 0 and gw.shape == w.shape


class _BackwardMasks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output_mask of every conv2d_act_backward call, and the preact/output
    tensor the backward receives (its `saved` argument)."""

    def __init__(self):
        super().__init__()
        self.masks, self.saved = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mtlcore.conv2d_act_backward.default:
            self.masks.append(list(args[10]))
            self.saved.append(args[3])
        return func(*args, **(kwargs or {}))


def test_backward_computes_what_the_engine_uses(device):
    """The autograd node asks the kernel only for the gradients this backward call uses (not
    every input that requires grad): autograd.grad of the input alone computes no weight or bias
    gradient, backward(inputs=...) likewise; each returned gradient matches the reference."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=torch.float64).to(device)
    b = torch.randn(5, generator=gen, dtype=torch.float64).to(device)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    h = x * 1.5  # a non-leaf input, as inside a network
    ref_out = reference.conv2d_act(h, w, b, padding=1, activation="gelu")
    expected = dict(zip("hwb", torch.autograd.grad(ref_out.sum(), (h, w, b)), strict=True))
    out = ops.conv2d_act(h, w, b, padding=1, activation="gelu")
    for wanted, mask in [("h", [True, False, False]), ("wb", [False, True, True])]:
        with _BackwardMasks() as seen:
            got = torch.autograd.grad(
                out.sum(), [dict(h=h, w=w, b=b)[k] for k in wanted], retain_graph=True
            )
        assert seen.masks == [mask]
        for k, g in zip(wanted, got, strict=True):
            assert_close(g, expected[k])
    with _BackwardMasks() as seen:
        out.sum().backward(inputs=[b], retain_graph=True)
    assert seen.masks == [[False, False, True]]
    assert_close(b.grad, expected["b"])
    # gelu's backward gets the pre-activation, kept by the forward (not recomputed).
    assert_close(seen.saved[0], F.conv2d(h, w, b, padding=1))
    with _BackwardMasks() as seen:
        out.sum().backward()
    assert seen.masks == [[True, True, True]]
    assert_close(w.grad, expected["w"])
    assert_close(x.grad, 1.5 * expected["h"])


def test_changing_the_output_in_place_is_caught(device):
    """relu's backward reads the output: modifying it in place before backward must raise, as
    for torch's own ops (the node keeps it detached, sharing its version counter)."""
    x = torch.randn(2, 3, 6, 6, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    out = ops.conv2d_act(x, w, None, activation="relu")
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_empty_batch(device):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    out = ops.conv2d_act(x, w, b, padding=1)
    assert out.shape == (0, 4, 8, 8)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.all(gw == 0) and torch.all(gb == 0)


@pytest.mark.parametrize("input_grad", [True, False])
def test_cpu_results_do_not_depend_on_threads(input_grad):
    gen = torch.Generator().manual_seed(7)
    channels = 16 if input_grad else 3  # a first layer: G computed in the weight gradient
    x = torch.randn(11, channels, 11, 11, generator=gen).requires_grad_(input_grad)
    w = torch.randn(24, channels, 3, 3, generator=gen).requires_grad_()
    b = torch.randn(24, generator=gen).requires_grad_()
    inputs = (x, w, b) if input_grad else (w, b)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = ops.conv2d_act(x, w, b, padding=1, activation="gelu")
            results.append([out, *torch.autograd.grad(out.square().sum(), inputs)])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            assert torch.equal(a, b_)


def test_cpu_scratch_memory_does_not_leak_between_calls():
    """The CPU kernels keep their scratch buffers between calls (csrc/cpu/scratch.h): a larger
    call that leaves NaN in every one of them must not change a later call's results."""
    gen = torch.Generator().manual_seed(11)
    cases = [  # (input shape, out channels, keyword arguments): the kernels' main paths
        ((2, 3, 9, 9), 32, {"padding": 1}),
        ((4, 16, 6, 6), 20, {}),
        ((3, 8, 7, 5), 6, {"stride": 2, "padding": 1}),
        ((2, 12, 8, 8), 12, {"padding": 1, "groups": 3}),
    ]
    inputs = [
        (
            torch.randn(shape, generator=gen),
            torch.randn(k, shape[1] // kw.get("groups", 1), 3, 3, generator=gen),
            kw,
        )
        for shape, k, kw in cases
    ]

    def run(x, w, kw, activation="relu", grad_value=1.0, op=ops.conv2d_act, input_grad=True):
        x, w = x.clone().requires_grad_(input_grad), w.clone().requires_grad_()
        b = torch.zeros(w.shape[0], requires_grad=True)
        out = op(x, w, b, activation=activation, **kw)
        inputs = (x, w, b) if input_grad else (w, b)
        grads = torch.autograd.grad(out, inputs, torch.full_like(out, grad_value))
        return [out, *grads]

    # With and without the input gradient (then G is computed in chunks, for <= 64 depth rows).
    variants = [(case, grad) for case in inputs for grad in (True, False)]
    before = [run(*case, input_grad=grad) for case, grad in variants]
    nan = float("nan")
    for kw in ({"padding": 1}, {}):  # NaN in the padded copies, G and every workspace
        for channels, input_grad in ((48, True), (7, False)):
            w = torch.randn(64, channels, 3, 3, generator=gen)
            x = torch.full((8, channels, 20, 20), nan)
            results = run(x, w, kw, "identity", nan, input_grad=input_grad)
            assert all(torch.isnan(r).all() for r in results)
    after = [run(*case, input_grad=grad) for case, grad in variants]
    for first, second, (case, grad) in zip(before, after, variants, strict=True):
        expected = run(*case, op=reference.conv2d_act, input_grad=grad)
        for a, b, ref in zip(first, second, expected, strict=True):
            assert torch.equal(a, b)
            torch.testing.assert_close(b, ref, rtol=1e-4, atol=1e-4)


def test_every_isa_path_matches_the_reference(tmp_path):
    """The base, AVX2 and AVX-512 kernels (those this CPU runs) each match the reference."""
    script = (
        "import sys, torch, mtlcore\n"
        "from mtlcore import ops, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(3, 8, 10, 9, generator=g, requires_grad=True)\n"
        "w = torch.randn(12, 4, 3, 3, generator=g, requires_grad=True)\n"
        "b = torch.randn(12, generator=g, requires_grad=True)\n"
        "for stride in (1, 2):\n"
        "    out = ops.conv2d_act(x, w, b, stride, 1, 1, 2, 'tanh')\n"
        "    ref = reference.conv2d_act(x, w, b, stride, 1, 1, 2, 'tanh')\n"
        "    for a, e in zip([out, *torch.autograd.grad(out.sum(), (x, w, b))],\n"
        "                    [ref, *torch.autograd.grad(ref.sum(), (x, w, b))]):\n"
        "        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))\n"
        "    # No input gradient: G computed inside the weight gradient.\n"
        "    out = ops.conv2d_act(x.detach(), w, b, stride, 1, 1, 2, 'tanh')\n"
        "    ref = reference.conv2d_act(x.detach(), w, b, stride, 1, 1, 2, 'tanh')\n"
        "    for a, e in zip(torch.autograd.grad(out.square().sum(), (w, b)),\n"
        "                    torch.autograd.grad(ref.square().sum(), (w, b))):\n"
        "        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))\n"
        "# 32 output channels: the direct weight gradient (G^T panels) on every path.\n"
        "w2 = torch.randn(32, 8, 3, 3, generator=g, requires_grad=True)\n"
        "out = ops.conv2d_act(x, w2, None, 2, 1, 1, 1, 'silu')\n"
        "ref = reference.conv2d_act(x, w2, None, 2, 1, 1, 1, 'silu')\n"
        "for a, e in zip(torch.autograd.grad(out.square().sum(), (x, w2)),\n"
        "                torch.autograd.grad(ref.square().sum(), (x, w2))):\n"
        "    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))\n"
        "print(mtlcore.build_info()['cpu_isa'])\n"
    )
    used = set()
    for isa in ("base", "avx2", "avx512"):
        env = {**os.environ, "MTLCORE_CPU_ISA": isa}
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        used.add(run.stdout.strip())
    assert "base" in used


# ------------------------------------------------------------------------------------------
# opcheck, torch.compile, autocast
# ------------------------------------------------------------------------------------------


def op_samples(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 7, 6, generator=gen).to(device)
    w = torch.randn(6, 2, 3, 3, generator=gen).to(device)
    b = torch.randn(6, generator=gen).to(device)
    yield (x, w, b, [1, 1], [1, 1], [1, 1], 2, "relu", 0.0)
    yield (
        x.requires_grad_(),
        w.requires_grad_(),
        None,
        [2, 1],
        [0, 1, 2, 0],
        [1, 2],
        1 + 1,
        "gelu",
        0.0,
    )
    yield (
        x.contiguous(memory_format=torch.channels_last),
        w,
        b,
        [1, 1],
        [1, 1],
        [1, 1],
        2,
        "silu",
        0.0,
    )


def test_opcheck(device):
    for args in op_samples(device):
        torch.library.opcheck(torch.ops.mtlcore.conv2d_act.default, args)
        torch.library.opcheck(torch.ops.mtlcore.conv2d_act_with_preact.default, args)
        x, w, b, stride, padding, dilation, groups, act, slope = args
        out = torch.ops.mtlcore.conv2d_act(*args).detach()
        grad = torch.randn_like(out)
        backward_args = (
            grad,
            x.detach(),
            w.detach(),
            out,
            stride,
            padding,
            dilation,
            groups,
            act,
            slope,
            [True, True, b is not None],
        )
        torch.library.opcheck(torch.ops.mtlcore.conv2d_act_backward.default, backward_args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    def block(x, w1, b1, w2):
        y = ops.conv2d_act(x, w1, b1, padding="same", activation="gelu")
        return ops.conv2d_act(y, w2, None, stride=2, activation="relu").sum()

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 9, 9, generator=gen).to(device)
    w1 = torch.randn(8, 3, 3, 3, generator=gen).to(device).requires_grad_()
    b1 = torch.randn(8, generator=gen).to(device).requires_grad_()
    w2 = torch.randn(4, 8, 3, 3, generator=gen).to(device).requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    got = compiled(x, w1, b1, w2)
    want = block(x, w1, b1, w2)
    assert_close(got, want)
    for a, b in zip(
        torch.autograd.grad(got, (w1, b1, w2)),
        torch.autograd.grad(want, (w1, b1, w2)),
        strict=True,
    ):
        assert_close(a, b)


def test_compile_dynamic_shapes_without_recompiling(device):
    """A model compiled with dynamic shapes (a last, smaller batch; other image sizes) traces
    the fake kernel once: it keeps every size symbolic (no specialisation, so no
    recompilation), and the compiled values and gradients match eager at each size."""

    def block(x, w1, b1, w2):
        y = ops.conv2d_act(x, w1, b1, padding="same", dilation=2, activation="silu")
        return ops.conv2d_act(y, w2, None, stride=2, padding=1, activation="relu").square().sum()

    gen = torch.Generator().manual_seed(12)
    w1 = torch.randn(5, 3, 3, 3, generator=gen).to(device).requires_grad_()
    b1 = torch.randn(5, generator=gen).to(device).requires_grad_()
    w2 = torch.randn(4, 5, 3, 3, generator=gen).to(device).requires_grad_()
    compiled = CompiledOnce(block)
    # Sizes that match no other dimension (duck sizing would tie equal sizes together).
    for n, h, w in [(6, 17, 23), (7, 19, 22), (9, 26, 18)]:
        x = torch.randn(n, 3, h, w, generator=gen).to(device).requires_grad_()
        got, want = compiled(x, w1, b1, w2), block(x, w1, b1, w2)
        assert_close(got, want)
        for a, b in zip(
            torch.autograd.grad(got, (x, w1, b1, w2)),
            torch.autograd.grad(want, (x, w1, b1, w2)),
            strict=True,
        ):
            assert_close(a, b)


def test_autocast(device):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 8, 8, generator=gen).to(device)
    w = torch.randn(6, 3, 3, 3, generator=gen).to(device).requires_grad_()
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        out = ops.conv2d_act(x, w, None, padding=1, activation="silu")
    # CPU kernels compute in float32 (fp32 inputs are not rounded); CUDA in the autocast dtype
    # with fp32 accumulation.
    if device == "cpu":
        assert out.dtype == torch.float32
        ref = reference.conv2d_act(x, w, padding=1, activation="silu")
    else:
        assert out.dtype == dtype
        ref = reference.conv2d_act(
            x.to(dtype).float(), w.to(dtype).float(), padding=1, activation="silu"
        )
    assert_close(out.float(), ref, rtol=1e-2 if device == "cuda" else 1e-4)
    with torch.autocast(device, dtype=dtype):
        low = ops.conv2d_act(x.to(dtype), w.detach().to(dtype), None, padding=1)
    assert low.dtype == out.dtype
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
def test_half_precision_on_cuda(dtype, activation):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 16, 13, 13, generator=gen).cuda()
    w = (torch.randn(32, 16, 3, 3, generator=gen) / 12).cuda()
    b = torch.randn(32, generator=gen).cuda()
    xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
    out = ops.conv2d_act(xs, ws, bs, padding=1, activation=activation)
    assert out.dtype == dtype
    xr, wr, br = (t.to(dtype).double().requires_grad_() for t in (x, w, b))
    ref = reference.conv2d_act(xr, wr, br, padding=1, activation=activation)
    assert_close(out.double(), ref, rtol=1e-2)
    grad = torch.randn(out.shape, generator=gen).cuda()
    got = torch.autograd.grad(out, (xs, ws, bs), grad.to(dtype))
    want = torch.autograd.grad(ref, (xr, wr, br), grad.double())
    for a, e in zip(got, want, strict=True):
        assert_close(a.double(), e, rtol=2e-2)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_nan_and_inf_inputs_propagate_like_torch(device, activation):
    """NaN and +-inf in the input give NaN/inf outputs and gradients where F.conv2d + the
    activation gives them (relu passes the gradient through a NaN output, as
    threshold_backward does)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 2, 5, 1] = -float("inf")
    w = torch.randn(4, 3, 3, 3, generator=gen)
    b = torch.randn(4, generator=gen)
    grad = torch.randn(2, 4, 6, 6, generator=gen)
    results = []
    for ours in (True, False):
        xs, ws, bs = (t.to(device).requires_grad_() for t in (x, w, b))
        if ours:
            out = ops.conv2d_act(xs, ws, bs, padding=1, activation=activation, negative_slope=SLOPE)
        else:
            out = FUNCTIONAL[activation](F.conv2d(xs, ws, bs, padding=1))
        results.append([out, *torch.autograd.grad(out, (xs, ws, bs), grad.to(device))])
    if activation == "gelu":
        # torch's exact gelu returns NaN for a +inf input on some machines (2.14.1 on an
        # AVX-512 Xeon, on every ATEN_CPU_CAPABILITY; +inf on an AVX2 EPYC) where the limit,
        # x * Phi(x) -> +inf, is what we return: expect the limit there.
        pre = F.conv2d(x, w, b, padding=1).to(device)
        eager = results[1][0]
        results[1][0] = torch.where((pre == math.inf) & eager.isnan(), math.inf, eager)
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_tf32_follows_torch_flag():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 64, 16, 16, generator=gen).cuda()
    w = torch.randn(64, 64, 3, 3, generator=gen).cuda()
    exact = reference.conv2d_act(x.double(), w.double(), padding=1, activation="identity")
    torch.backends.cudnn.allow_tf32 = False
    fp32 = ops.conv2d_act(x, w, padding=1, activation="identity")
    assert_close(fp32.double(), exact, rtol=1e-5)
    torch.backends.cudnn.allow_tf32 = True
    tf32 = ops.conv2d_act(x, w, padding=1, activation="identity")
    assert_close(tf32.double(), exact, rtol=5e-3)
    # torch's newer per-operator flags: conv and rnn set differently, which makes the
    # operator-less query raise; ours reads the conv flag as F.conv2d does.
    old = torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision
    try:
        torch.backends.cudnn.rnn.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        ieee = ops.conv2d_act(x, w, padding=1, activation="identity")
        assert_close(ieee.double(), exact, rtol=1e-5)
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        y = ops.conv2d_act(x.requires_grad_(), w, padding=1, activation="identity")
        assert_close(y.double(), exact, rtol=5e-3)
        y.sum().backward()  # the backward reads the flag too
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cudnn.rnn.fp32_precision = old


# ------------------------------------------------------------------------------------------
# Conv2dAct and fuse()
# ------------------------------------------------------------------------------------------


def test_conv2dact_is_a_conv2d_with_an_activation(device):
    torch.manual_seed(13)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, device=device)
    torch.manual_seed(13)
    fused = mnn.Conv2dAct(3, 8, 3, stride=2, padding=1, device=device, activation="tanh")
    assert torch.equal(conv.weight, fused.weight) and torch.equal(conv.bias, fused.bias)
    fused.load_state_dict(conv.state_dict())
    conv.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 9, 9, device=device)
    assert_close(fused(x), torch.tanh(conv(x)))
    assert "activation=tanh" in repr(fused)
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        mnn.Conv2dAct(3, 8, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="unknown activation"):
        mnn.Conv2dAct(3, 8, 3, activation="swish")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Sequential(nn.Conv2d(16, 32, 3, padding="same"), nn.GELU(approximate="tanh")),
            nn.Conv2d(32, 32, 3, groups=32, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 8, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
            nn.Tanh(),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.trunk(x).mean((2, 3)))


def test_fuse_keeps_weights_names_and_outputs(device):
    torch.manual_seed(14)
    model = SmallNet().to(device)
    fused = mnn.fuse(model)
    kinds = [type(m).__name__ for m in fused.trunk]
    assert kinds.count("Conv2dAct") == 3 and kinds.count("Identity") == 3
    assert type(fused.trunk[3][0]) is mnn.Conv2dAct
    assert fused.trunk[0].activation == "relu" and fused.trunk[6].negative_slope == 0.2
    assert type(fused.trunk[8]) is nn.Conv2d  # circular padding is not fused
    assert all(type(m) is not mnn.Conv2dAct for m in model.modules())  # the input is unchanged
    assert list(fused.state_dict()) == list(model.state_dict())
    fused.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, 20, 20, device=device)
    out, ref = fused(x), model(x)
    assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), list(fused.parameters()))
    ref_grads = torch.autograd.grad(ref.sum(), list(model.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close(a, b, rtol=1e-3)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def good_args():
    return dict(
        input=torch.randn(2, 4, 8, 8),
        weight=torch.randn(6, 2, 3, 3),
        bias=torch.randn(6),
        stride=1,
        padding=1,
        dilation=1,
        groups=2,
        activation="relu",
    )


BAD_INPUT = [
    ({"input": torch.randn(4, 8, 8)}, ValueError, "input must be a 4-d"),
    ({"weight": torch.randn(6, 2, 3)}, ValueError, "weight must be a 4-d"),
    ({"input": torch.randn(2, 5, 8, 8)}, ValueError, "groups=2 does not divide"),
    ({"weight": torch.randn(5, 2, 3, 3), "bias": None}, ValueError, "groups=2 does not divide"),
    ({"weight": torch.randn(6, 3, 3, 3)}, ValueError, r"weight.size\(1\)"),
    ({"padding": 0, "input": torch.randn(2, 4, 2, 8)}, ValueError, "larger than the padded"),
    ({"dilation": 5}, ValueError, "larger than the padded"),
    ({"activation": "swish"}, ValueError, "unknown activation 'swish'"),
    ({"weight": torch.randn(6, 2, 3, 3, dtype=torch.float64)}, TypeError, "weight has dtype"),
    ({"bias": torch.randn(6, dtype=torch.float64)}, TypeError, "bias has dtype"),
    ({"bias": torch.randn(5)}, ValueError, "bias must have shape"),
    (
        {
            "input": torch.ones(2, 4, 8, 8, dtype=torch.int32),
            "weight": torch.ones(6, 2, 3, 3, dtype=torch.int32),
            "bias": None,
        },
        TypeError,
        "input has dtype",
    ),
    ({"stride": 0}, ValueError, "stride must be >= 1"),
    ({"padding": -1}, ValueError, "padding must be >= 0"),
    ({"groups": 0}, ValueError, "groups must be >= 1"),
    ({"padding": "full"}, ValueError, "padding must be an int, a pair"),
    ({"padding": "same", "stride": 2}, ValueError, "padding='same' needs stride 1"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUT)
def test_bad_input(overrides, error, match):
    args = {**good_args(), **overrides}
    with pytest.raises(error, match=match):
        ops.conv2d_act(**args)


def test_bad_input_through_the_raw_ops():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        torch.ops.mtlcore.conv2d_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, "swish", 0.0)
    with pytest.raises(ValueError, match="padding must have 2 values"):
        torch.ops.mtlcore.conv2d_act(x, w, None, [1, 1], [1, 1, 1], [1, 1], 1, "relu", 0.0)
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        torch.ops.mtlcore.conv2d_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", float("nan"))
    out = torch.ops.mtlcore.conv2d_act(x, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        torch.ops.mtlcore.conv2d_act_backward(
            out[:, :3], x, w, out, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, [True, True, False]
        )
    with pytest.raises(TypeError, match="saved has dtype"):
        torch.ops.mtlcore.conv2d_act_backward(
            out, x, w, out.double(), [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, [True, True, False]
        )
    with pytest.raises(TypeError, match="input has dtype Half"):
        torch.ops.mtlcore.conv2d_act(
            x.half(), w.half(), None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0
        )


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_device_mismatch():
    x, w = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(6, 4, 3, 3)
    with pytest.raises((ValueError, RuntimeError), match="weight is on"):
        ops.conv2d_act(x, w)
    with pytest.raises((ValueError, RuntimeError), match="bias is on"):
        ops.conv2d_act(x, w.cuda(), torch.randn(6))
