"""mtlcore.ops.max_pool2d against F.max_pool2d and mtlcore.reference; ties and NaN, layouts,
dtypes, gradcheck, opcheck, torch.compile, autocast, the MaxPool2d module, and bad input."""

from __future__ import annotations

import itertools
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


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x as a contiguous, channels_last or non-contiguous (strided view) tensor, same values."""
    if kind == "contiguous":
        return x.contiguous()
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def with_ties(shape, gen, device, dtype=torch.float32):
    """Values k / 4 for small integers k: many windows hold equal maxima, so the tie rule
    (the first maximum takes the gradient) is exercised everywhere."""
    return (torch.randint(-6, 7, shape, generator=gen) / 4).to(device=device, dtype=dtype)


def grid():
    """(kernel, stride, padding, dilation, ceil_mode) that F.max_pool2d accepts for some size."""
    for k, s, p, d, ceil in itertools.product(
        [(1, 1), (2, 2), (3, 3), (2, 3)], [1, 2, (2, 1), 3], [0, 1], [1, 2], [False, True]
    ):
        if p > min(k) // 2:
            continue
        yield k, s, p, d, ceil


# 1x1 images, odd sizes, 1 channel, batch 13, more channels than one channels_last block (64),
# and rows of 2x2 windows that take the CPU's 8-wide (16x17) and 4-wide (9x13) vector blocks.
SIZES = [(1, 1, 1, 1), (2, 3, 7, 5), (13, 1, 6, 6), (3, 4, 16, 17), (2, 3, 9, 13), (1, 70, 5, 4)]


def torch_accepts(x, *args) -> bool:
    try:
        out = F.max_pool2d(x.detach(), *args)
    except RuntimeError:
        return False
    # A window with no element inside the input gives -inf; torch's backward then writes its
    # gradient out of bounds (the recorded index lies outside the input), so keep clear.
    return not torch.isinf(out).any()


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
def test_matches_functional_and_reference(device, kind):
    gen = torch.Generator().manual_seed(zlib.crc32(kind.encode()))
    count = 0
    for size, (k, s, p, d, ceil) in itertools.product(SIZES, grid()):
        x = layout(with_ties(size, gen, device), kind).requires_grad_()
        args = (k, s, p, d, ceil)
        if not torch_accepts(x, *args):
            continue
        what = f"{kind} {size} k={k} s={s} p={p} d={d} ceil={ceil}"
        out = ops.max_pool2d(x, *args)
        want = F.max_pool2d(x, *args)
        ref = reference.max_pool2d(x, *args)
        assert torch.equal(out, want), what
        assert torch.equal(out, ref), what
        expect_cl = kind == "channels_last" and not x.is_contiguous()
        assert out.is_contiguous(
            memory_format=torch.channels_last if expect_cl else torch.contiguous_format
        ), what
        grad = with_ties(out.shape, gen, device)
        got = torch.autograd.grad(out, x, grad)[0]
        # Sums of k / 4 values are exact in float32: any order gives the same gradient.
        assert torch.equal(got, torch.autograd.grad(want, x, grad)[0]), what
        assert torch.equal(got, torch.autograd.grad(ref, x, grad)[0]), what
        count += 1
    assert count > 300


def test_nan_and_infinities_propagate_as_in_pytorch(device):
    gen = torch.Generator().manual_seed(5)
    for k, s, p, d, ceil in grid():
        x = torch.randn(2, 3, 9, 8, generator=gen).to(device)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
        where = torch.randint(0, x.numel(), (30,), generator=gen)
        x.view(-1)[where.to(device)] = specials.repeat(8)[:30].to(device)
        x.requires_grad_()
        args = (k, s, p, d, ceil)
        if not torch_accepts(torch.nan_to_num(x, neginf=0.0), *args):
            continue
        out, want = ops.max_pool2d(x, *args), F.max_pool2d(x, *args)
        assert torch.equal(out.isnan(), want.isnan())
        torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)
        grad = torch.randn(out.shape, generator=gen).to(device)
        torch.testing.assert_close(
            torch.autograd.grad(out, x, grad)[0],
            torch.autograd.grad(want, x, grad)[0],
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_empty_windows_give_minus_infinity_and_no_gradient(device, kind):
    """With dilation the windows of a one-row image can miss the input entirely."""
    x = layout(torch.randn(2, 3, 1, 2, device=device), kind).requires_grad_()
    out = ops.max_pool2d(x, 2, 1, 1, 2)
    assert out.shape == F.max_pool2d(x.detach(), 2, 1, 1, 2).shape
    assert torch.all(out == -float("inf"))
    ref = reference.max_pool2d(x, 2, 1, 1, 2)
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(device, dtype):
    gen = torch.Generator().manual_seed(6)
    for kind, (k, s, p) in itertools.product(
        ["contiguous", "channels_last"], [(2, 2, 0), (3, 2, 1), (3, 1, 1)]
    ):
        x = layout(torch.randn(2, 5, 9, 7, generator=gen).to(device, dtype), kind)
        x.requires_grad_()
        out = ops.max_pool2d(x, k, s, p)
        assert out.dtype == dtype
        assert torch.equal(out, F.max_pool2d(x, k, s, p))
        grad = torch.randn(out.shape, generator=gen).to(device, dtype)
        got = torch.autograd.grad(out, x, grad)[0]
        # Overlapping windows add in float (double) and round once: compare with the exact sum.
        x64 = x.detach().double().requires_grad_()
        exact = torch.autograd.grad(F.max_pool2d(x64, k, s, p), x64, grad.double())[0]
        assert torch.equal(got, exact.to(dtype)), (kind, k, s, p)


def test_unbatched_input(device):
    x = torch.randn(4, 9, 9, device=device)
    torch.testing.assert_close(ops.max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))


def test_gradcheck_float64(device):
    gen = torch.Generator().manual_seed(3)
    for kind, (k, s, p, d, ceil) in itertools.product(
        ["contiguous", "channels_last"],
        [(2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False)],
    ):
        # Distinct values far apart: the maxima do not change under gradcheck's perturbation.
        x = torch.randperm(2 * 3 * 7 * 6, generator=gen).reshape(2, 3, 7, 6).double() / 7
        x = layout(x.to(device), kind).requires_grad_()
        assert torch.autograd.gradcheck(ops.max_pool2d, (x, k, s, p, d, ceil))


def test_double_backward_raises(device):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    assert_double_backward_raises(ops.max_pool2d(x * 2, 2).sum(), [x], "max_pool2d")
    assert_nested_func_grad_raises(lambda x: ops.max_pool2d(x, 2).sum(), x.detach(), "max_pool2d")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_torch_func_grad_and_jacrev(device):
    x = torch.randperm(2 * 3 * 6 * 6).reshape(2, 3, 6, 6).double().to(device)
    jac = torch.func.jacrev(lambda x: ops.max_pool2d(x, 2))(x)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda x: F.max_pool2d(x, 2))(x))
    grad = torch.func.grad(lambda x: ops.max_pool2d(x, 3, 2, 1).sum())(x)
    torch.testing.assert_close(grad, torch.func.grad(lambda x: F.max_pool2d(x, 3, 2, 1).sum())(x))


def test_forward_mode_ad_raises(device):
    """No forward-mode formula: a dual input raises instead of losing its tangent."""
    x = torch.randn(2, 3, 8, 8, device=device)
    with pytest.raises(NotImplementedError, match="max_pool2d: forward-mode AD is not supported"):
        torch.func.jvp(lambda x: ops.max_pool2d(x, 2), (x,), (torch.ones_like(x),))


def test_empty_batch_and_channels(device):
    for shape in [(0, 3, 8, 8), (2, 0, 8, 8)]:
        x = torch.randn(shape, device=device, requires_grad=True)
        out = ops.max_pool2d(x, 2)
        assert out.shape == (*shape[:2], 4, 4)  # F.max_pool2d rejects C = 0; we need not
        assert torch.autograd.grad(out.sum(), x)[0].shape == x.shape


def test_graph_node_keeps_only_the_input(device):
    """The autograd node (C++) keeps the input, not indices: changing the input in place
    before backward must raise, as for torch's ops; without grad no node is made."""
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    h = x * 2
    out = ops.max_pool2d(h, 2)
    assert out.grad_fn is not None and out.grad_fn.name() == "MaxPool2dBackward"
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with torch.no_grad():
        assert ops.max_pool2d(x, 2).grad_fn is None
    assert ops.max_pool2d(x.detach(), 2).grad_fn is None


def test_cpu_results_do_not_depend_on_threads():
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(7)
            got = []
            for kind, k, s in itertools.product(["contiguous", "channels_last"], [2, 3], [1, 2]):
                x = layout(torch.randn(5, 70, 12, 11, generator=gen), kind).requires_grad_()
                out = ops.max_pool2d(x, k, s)
                got += [out, torch.autograd.grad(out.square().sum(), x)[0]]
            results.append(got)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_every_isa_path_matches_pytorch():
    """The base, AVX2 and AVX-512 loops (those this CPU runs) each give F.max_pool2d's results,
    including the 2x2 fast paths on rows long enough for their vector code."""
    script = (
        "import torch, torch.nn.functional as F, mtlcore\n"
        "from mtlcore import ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "cases = [((3, 4, 30, 37), 2, 2), ((2, 3, 7, 13), 2, 2), ((2, 3, 9, 8), 3, 1)]\n"
        "for shape, k, s in cases:\n"
        "    x = (torch.randint(-5, 6, shape, generator=g) / 4).requires_grad_()\n"
        "    x.data[0, 0, :4, :4] = float('nan')\n"
        "    gr = torch.randn(F.max_pool2d(x, k, s).shape, generator=g)\n"
        "    a, b = ops.max_pool2d(x, k, s), F.max_pool2d(x, k, s)\n"
        "    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)\n"
        "    torch.testing.assert_close(torch.autograd.grad(a, x, gr)[0],\n"
        "                               torch.autograd.grad(b, x, gr)[0], rtol=0, atol=1e-6)\n"
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
    yield (x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    yield (x.requires_grad_(), [3, 2], [2, 1], [1, 1], [1, 2], True)
    yield (x.contiguous(memory_format=torch.channels_last), [3, 3], [1, 1], [1, 1], [1, 1], False)
    yield (x[:, :, :, ::2], [2, 2], [1, 1], [0, 0], [1, 1], False)


def test_opcheck(device):
    for args in op_samples(device):
        torch.library.opcheck(torch.ops.mtlcore.max_pool2d.default, args)
        out = torch.ops.mtlcore.max_pool2d(*args).detach()
        backward_args = (torch.randn_like(out), args[0].detach(), *args[1:])
        torch.library.opcheck(torch.ops.mtlcore.max_pool2d_backward.default, backward_args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    def block(x, w):
        y = ops.conv2d_act(x, w, None, padding=1, activation="relu")
        return ops.max_pool2d(y, 2).square().sum() + ops.max_pool2d(y, 3, 1, 1).sum()

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 9, 9, generator=gen).to(device)
    w = torch.randn(8, 3, 3, 3, generator=gen).to(device).requires_grad_()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    got, want = compiled(x, w), block(x, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0])


def test_compile_dynamic_shapes_without_recompiling(device):
    """Compiled with dynamic shapes, the fake kernel's output size (ceil_mode included) stays
    symbolic: one trace serves every batch and image size."""

    def block(x):
        return (
            ops.max_pool2d(x, 3, 2, 1, ceil_mode=True).square().sum() + ops.max_pool2d(x, 2).sum()
        )

    gen = torch.Generator().manual_seed(13)
    compiled = CompiledOnce(block)
    for n, h, w in [(6, 17, 23), (7, 20, 22), (9, 26, 19)]:
        x = torch.randn(n, 4, h, w, generator=gen).to(device).requires_grad_()
        got, want = compiled(x), block(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0])


def test_autocast_keeps_the_input_dtype(device):
    """Max pooling is exact in any dtype, so under autocast it runs in its input's dtype, as
    F.max_pool2d does."""
    x = torch.randn(2, 3, 8, 8, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert ops.max_pool2d(x, 2).dtype == torch.float32
        assert ops.max_pool2d(x.bfloat16(), 2).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------


def test_module_matches_nn_maxpool2d(device):
    x = torch.randn(3, 4, 11, 10, device=device, requires_grad=True)
    for kwargs in [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)]:
        ours, theirs = mnn.MaxPool2d(**kwargs), nn.MaxPool2d(**kwargs)
        assert isinstance(ours, nn.MaxPool2d) and repr(ours) == repr(theirs)
        out = ours(x)
        assert torch.equal(out, theirs(x))
        assert torch.equal(
            torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(theirs(x).sum(), x)[0]
        )


def test_module_rejects_return_indices():
    with pytest.raises(ValueError, match="return_indices"):
        mnn.MaxPool2d(2, return_indices=True)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

BAD_INPUT = [
    ({"input": torch.randn(8, 8)}, ValueError, "input must be a 4-d"),
    ({"input": torch.randn(1, 2, 3, 8, 8)}, ValueError, "input must be a 4-d"),
    ({"input": torch.ones(2, 3, 8, 8, dtype=torch.int32)}, TypeError, "input has dtype Int"),
    ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
    ({"kernel_size": (2, 2, 2)}, ValueError, "kernel_size must be an int or a pair"),
    ({"kernel_size": 2.5}, ValueError, "kernel_size must be an int or a pair"),
    ({"stride": 0}, ValueError, "stride must be >= 1"),
    ({"stride": -1}, ValueError, "stride must be >= 1"),
    ({"padding": -1}, ValueError, "padding must be >= 0"),
    ({"padding": 2}, ValueError, "padding must be at most half of kernel_size"),
    ({"dilation": 0}, ValueError, "dilation must be >= 1"),
    ({"kernel_size": 9}, ValueError, "pooled output would be empty"),
    ({"kernel_size": 1 << 31}, ValueError, "kernel_size must be < 2"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUT)
def test_bad_input(overrides, error, match):
    args = {"input": torch.randn(2, 3, 8, 8), "kernel_size": 3, **overrides}
    with pytest.raises(error, match=match):
        ops.max_pool2d(**args)


def test_bad_input_through_the_raw_ops():
    x = torch.randn(2, 3, 8, 8)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    out = torch.ops.mtlcore.max_pool2d(x, *pool)
    with pytest.raises(ValueError, match="grad_output must have shape"):
        torch.ops.mtlcore.max_pool2d_backward(out[:, :2], x, *pool)
    with pytest.raises(TypeError, match="grad_output has dtype"):
        torch.ops.mtlcore.max_pool2d_backward(out.double(), x, *pool)
    with pytest.raises(ValueError, match="padding must have 2 values"):
        torch.ops.mtlcore.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0], [1, 1], False)
    with pytest.raises(ValueError, match="dense"):
        ops.max_pool2d(x.to_sparse(), 2)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_device_mismatch():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    out = ops.max_pool2d(x, 2)
    with pytest.raises((ValueError, RuntimeError), match="grad_output is on"):
        torch.ops.mtlcore.max_pool2d_backward(out.cpu(), x, [2, 2], [2, 2], [0, 0], [1, 1], False)
