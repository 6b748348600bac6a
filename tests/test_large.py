"""CUDA reliability: every op on tensors of more than 2^31 elements (64-bit indexing), checked
piece by piece against mtlcore.reference (marked ``large``: tens of GiB of device memory; skipped
where the device has less free); convolutions whose grids need more than one launch; the CUDA
convolution's coordinate limits; and bitwise-identical results of every op from run to run under
``torch.use_deterministic_algorithms(True)``."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import CUDA

from mtlcore import ops, reference

GiB = 2**30
# Elements of the big tensors: past 2^31 and not a multiple of any chunk or vector width.
BIG = 2**31 + 3 * 2**16 + 7
# Elements per piece when a big tensor is filled or checked piece by piece.
SPAN = 2**26

# Tolerances of a low-precision result against a float64 reference (as in tests/test_optim.py).
TOL = {
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


@pytest.fixture(autouse=True)
def release_cuda_memory():
    """Each test starts, and leaves, with the memory of earlier tests handed back."""
    if CUDA:
        gc.collect()
        torch.cuda.empty_cache()
    yield
    if CUDA:
        gc.collect()
        torch.cuda.empty_cache()


def require_free_memory(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * GiB:
        pytest.skip(f"needs {gib:.0f} GiB of free CUDA memory; the device has {free / GiB:.1f} GiB")


def spans(n: int, size: int = SPAN) -> list[tuple[int, int]]:
    return [(b, min(n, b + size)) for b in range(0, n, size)]


def random_span(seed: int, begin: int, end: int, uniform: bool = False) -> torch.Tensor:
    """Elements [begin, end) (one of spans(n)) of random_vector(n, ..., seed, uniform) in
    float32. Each span has a generator of its own, so it can be drawn again on its own."""
    gen = torch.Generator(device="cuda").manual_seed(seed * 1_000_003 + begin // SPAN)
    draw = torch.rand if uniform else torch.randn
    return draw(end - begin, generator=gen, device="cuda")


def random_vector(n: int, dtype: torch.dtype, seed: int, uniform: bool = False) -> torch.Tensor:
    """n standard normal (or uniform in [0, 1)) values in `dtype` on the GPU."""
    out = torch.empty(n, dtype=dtype, device="cuda")
    for b, e in spans(n):
        out[b:e] = random_span(seed, b, e, uniform)
    return out


def quantized(shape, gen: torch.Generator, dtype: torch.dtype, offset: float = 0.0):
    """Values k / 16 + offset with k in [-16, 16] on the GPU: exact in float16 (with offset
    1/512 too), and sums of a few hundred of their products are exact in float32."""
    out = torch.empty(shape, dtype=dtype, device="cuda")
    flat = out.view(-1)
    for b, e in spans(flat.numel()):
        k = torch.randint(-16, 17, (e - b,), generator=gen, device="cuda", dtype=torch.int16)
        flat[b:e] = k / 16 + offset
    return out


def assert_close(actual, expected, rtol: float, what: str) -> None:
    """|a - e| <= rtol |e| + 1e-5 max|e|: relative, except for elements far below the scale."""
    expected = expected.double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}"
    )


# ------------------------------------------------------------------------------------------
# More than 2^31 elements: fused optimizer updates
# ------------------------------------------------------------------------------------------


def check_updates(sizes, seeds, actual, update, dtype, names) -> None:
    """Draws the inputs of every group again, span by span (list l of group t from seed
    seeds[l][0] + t, uniform when seeds[l][1]), applies update(lists, t) to float64 copies
    (the reference, in place) and compares the lists `names` maps to with `actual`."""
    for t, n in enumerate(sizes):
        for b, e in spans(n):
            expected = [
                [random_span(seed + t, b, e, uniform).to(dtype).double()] for seed, uniform in seeds
            ]
            update(expected, t)
            for name, index in names.items():
                torch.testing.assert_close(
                    actual[index][t][b:e].double(),
                    expected[index][0],
                    **TOL[dtype],
                    msg=lambda m, name=name, t=t, b=b: f"{name}[{t}][{b}:]: {m}",
                )


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_sgd_more_than_2_31_elements():
    """A group of more than 2^31 elements (two launches of the multi-tensor apply) followed by
    a small one; every element against the reference."""
    require_free_memory(20)
    dtype = torch.float16
    sizes = (BIG, 1000)
    seeds = [(10, False), (20, False), (30, False)]  # params, grads, momentum_buffers
    lists = [[random_vector(n, dtype, s + t, u) for t, n in enumerate(sizes)] for s, u in seeds]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    ops.sgd_(*lists, **kw)
    check_updates(
        sizes,
        seeds,
        lists,
        lambda expected, t: reference.sgd_(*expected, **kw),
        dtype,
        {"params": 0, "momentum_buffers": 2},
    )


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_adam_more_than_2_31_elements():
    """As the SGD test, with all five Adam arrays (amsgrad), a step counter per group and a
    GradScaler's grad_scale (the grads are written back unscaled)."""
    require_free_memory(28)
    dtype = torch.bfloat16
    sizes = (BIG, 1000)
    # params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
    seeds = [(10, False), (20, False), (30, False), (40, True), (50, True)]
    lists = [[random_vector(n, dtype, s + t, u) for t, n in enumerate(sizes)] for s, u in seeds]
    steps = [torch.tensor(3.0, device="cuda"), torch.tensor(5.0, device="cuda")]
    kw = dict(
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.01,
        amsgrad=True,
        grad_scale=torch.tensor(4.0, device="cuda"),
    )
    ops.adam_(*lists, steps, **kw)
    check_updates(
        sizes,
        seeds,
        lists,
        lambda expected, t: reference.adam_(*expected, [steps[t]], **kw),
        dtype,
        {"params": 0, "grads": 1, "exp_avgs": 2, "exp_avg_sqs": 3, "max_exp_avg_sqs": 4},
    )


# ------------------------------------------------------------------------------------------
# More than 2^31 elements: multitask_loss
# ------------------------------------------------------------------------------------------


def reference_task(logits, target, kind, grad, coef, pieces, rtol, what, **kw) -> float:
    """The task's mean loss by mtlcore.reference in float64, piece by piece (pieces: pairs of
    a logits index and a target index, covering the task once). On the way, checks `grad` (ours:
    d total / d logits) against coef * d(mean loss) / d logits, piece by piece."""

    def valid(y):
        return y != kw.get("ignore_index", -100) if kind == "ce" else ~torch.isnan(y)

    count = max(1, sum(int(valid(target[yi]).sum()) for _, yi in pieces))
    loss_sum = 0.0
    for xi, yi in pieces:
        x = logits[xi].double().requires_grad_()
        y = target[yi] if kind == "ce" else target[yi].double()
        part = reference.task_loss(x, y, kind, **kw) * int(valid(y).sum())
        (g,) = torch.autograd.grad(part, x)
        loss_sum += float(part)
        assert_close(grad[xi], g * (coef / count), rtol, f"{what}: gradient at {xi}")
    return loss_sum / count


def small_bce_task(dtype, gen):
    """A small second task after the big one (its work items come last)."""
    x = torch.randn(300, 5, generator=gen, device="cuda").to(dtype).requires_grad_()
    y = torch.rand(300, 5, generator=gen, device="cuda").to(dtype)
    y[torch.rand(300, 5, generator=gen, device="cuda") < 0.1] = float("nan")
    return x, y


def check_losses(total, per_task, expected, weights) -> None:
    want = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(per_task.detach().double().cpu(), want, rtol=1e-5, atol=0)
    want_total = (weights.double().cpu() * want).sum()
    torch.testing.assert_close(total.detach().double().cpu(), want_total, rtol=1e-5, atol=0)


WHOLE = ((slice(None),), (slice(None),))
WEIGHTS = (1.5, 0.5)


def multitask_loss_with_small_task(x, y, kind, dtype, gen, **kw):
    """ops.multitask_loss over (x, y, kind) and a small bce task, weighted by WEIGHTS; returns
    total, per_task, the small task, and the gradients of total for x and the small logits."""
    small_x, small_y = small_bce_task(dtype, gen)
    weights = torch.tensor(WEIGHTS, device="cuda")
    total, per_task = ops.multitask_loss([x, small_x], [y, small_y], [kind, "bce"], weights, **kw)
    grad, small_grad = torch.autograd.grad(total, [x, small_x])
    return total, per_task, (small_x.detach(), small_y, small_grad), grad


def check_small_task_and_losses(total, per_task, small, big_loss, rtol) -> None:
    small_x, small_y, small_grad = small
    small_loss = reference_task(
        small_x, small_y, "bce", small_grad, WEIGHTS[1], [WHOLE], rtol, "bce"
    )
    check_losses(total, per_task, [big_loss, small_loss], torch.tensor(WEIGHTS))


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    "classes", [10, 1000, 4099], ids=["thread_rows", "warp_rows", "block_rows"]
)
def test_multitask_loss_ce_rows_more_than_2_31_elements(classes):
    """ce logits [B, C] of more than 2^31 elements (a thread, a warp or the block per row), 10%
    of the labels ignored, then a small bce task; losses and gradients against the reference."""
    require_free_memory(20)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(classes)
    rows = -(-BIG // classes)
    x = random_vector(rows * classes, dtype, seed=1).view(rows, classes).requires_grad_()
    y = torch.randint(classes, (rows,), generator=gen, device="cuda")
    y[torch.rand(rows, generator=gen, device="cuda") < 0.1] = -100
    total, per_task, small, grad = multitask_loss_with_small_task(x, y, "ce", dtype, gen)
    step = max(1, SPAN // classes)
    pieces = [((slice(b, b + step),), (slice(b, b + step),)) for b in range(0, rows, step)]
    rtol = 2 * torch.finfo(dtype).eps
    loss = reference_task(x.detach(), y, "ce", grad, WEIGHTS[0], pieces, rtol, "ce")
    check_small_task_and_losses(total, per_task, small, loss, rtol)


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_multitask_loss_dense_ce_more_than_2_31_elements():
    """Dense ce logits [2, 64, 4097, 4096] (2^31 + 2^19 elements: a thread per pixel reading
    the classes S apart), 10% of the labels ignored, label smoothing, then a small bce task."""
    require_free_memory(20)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(2)
    n, c, h, w = 2, 64, 4097, 4096
    x = random_vector(n * c * h * w, dtype, seed=2).view(n, c, h, w).requires_grad_()
    y = torch.randint(c, (n, h, w), generator=gen, device="cuda")
    y[torch.rand(n, h, w, generator=gen, device="cuda") < 0.1] = -100
    kw = dict(label_smoothing=0.1)
    total, per_task, small, grad = multitask_loss_with_small_task(x, y, "ce", dtype, gen, **kw)
    hh = SPAN // (c * w)
    pieces = [
        ((slice(i, i + 1), slice(None), slice(r, r + hh)), (slice(i, i + 1), slice(r, r + hh)))
        for i in range(n)
        for r in range(0, h, hh)
    ]
    rtol = 2 * torch.finfo(dtype).eps
    loss = reference_task(x.detach(), y, "ce", grad, WEIGHTS[0], pieces, rtol, "dense ce", **kw)
    check_small_task_and_losses(total, per_task, small, loss, rtol)


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_multitask_loss_elementwise_more_than_2_31_elements(kind):
    """bce on dense logits [2^21 + 3, 1024], mse on a row-strided head of that shape (the first
    1024 columns of [2^21 + 3, 1032], as torch.split of one Linear gives), 5% of the targets
    missing (NaN), then a small bce task; losses and gradients against the reference."""
    require_free_memory(24)
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows, cols = 2**21 + 3, 1024
    width = cols + (8 if kind == "mse" else 0)
    base = random_vector(rows * width, dtype, seed=3).view(rows, width).requires_grad_()
    x = base[:, :cols]
    y = random_vector(rows * cols, dtype, seed=4, uniform=kind == "bce")
    for b, e in spans(y.numel()):
        y[b:e].masked_fill_(torch.rand(e - b, generator=gen, device="cuda") < 0.05, float("nan"))
    y = y.view(rows, cols)
    total, per_task, small, grad = multitask_loss_with_small_task(x, y, kind, dtype, gen)
    step = SPAN // cols
    pieces = [((slice(b, b + step),), (slice(b, b + step),)) for b in range(0, rows, step)]
    rtol = 2 * torch.finfo(dtype).eps
    loss = reference_task(x.detach(), y, kind, grad, WEIGHTS[0], pieces, rtol, kind)
    check_small_task_and_losses(total, per_task, small, loss, rtol)


# ------------------------------------------------------------------------------------------
# More than 2^31 elements: conv2d_act
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("groups", [1, 32], ids=["gemm", "depthwise"])
def test_conv2d_act_more_than_2_31_elements(groups):
    """Input, output and their gradients of 64 x 32 x 1025 x 1024 (2^31 + 2^26 elements) in
    float16, through the implicit GEMMs or the depthwise kernels; every four images against
    F.conv2d (float32) + relu on those images. Quantized values keep both sides exact up to
    the rounding to float16; the bias's 1/512 offset keeps every pre-activation off relu's kink."""
    require_free_memory(28)
    n, c, h, w, k = 64, 32, 1025, 1024, 32
    dtype = torch.float16
    gen = torch.Generator(device="cuda").manual_seed(groups)
    x = quantized((n, c, h, w), gen, dtype).requires_grad_()
    weight = quantized((k, c // groups, 3, 3), gen, dtype).requires_grad_()
    bias = quantized((k,), gen, dtype, offset=1 / 512).requires_grad_()
    out = ops.conv2d_act(x, weight, bias, padding=1, groups=groups, activation="relu")
    grad_out = quantized(out.shape, gen, dtype)
    gx, gw, gb = torch.autograd.grad(out, (x, weight, bias), grad_out)
    out = out.detach()

    w32, b32 = weight.detach().float(), bias.detach().float()
    gw_ref = torch.zeros_like(w32, dtype=torch.float64)
    gb_ref = torch.zeros_like(b32, dtype=torch.float64)
    rtol = 2 * torch.finfo(dtype).eps
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for i in range(0, n, 4):
            images = slice(i, i + 4)
            xr = x.detach()[images].float().requires_grad_()
            wr, br = w32.clone().requires_grad_(), b32.clone().requires_grad_()
            ref = reference.conv2d_act(xr, wr, br, 1, 1, 1, groups, "relu")
            assert_close(out[images], ref.half(), rtol, f"output of images {i}..{i + 3}")
            rx, rw, rb = torch.autograd.grad(ref, (xr, wr, br), grad_out[images].float())
            assert_close(gx[images], rx.half(), rtol, f"grad_input of images {i}..{i + 3}")
            gw_ref += rw
            gb_ref += rb
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert_close(gw, gw_ref.half(), rtol, "grad_weight")
    assert_close(gb, gb_ref.half(), rtol, "grad_bias")


# ------------------------------------------------------------------------------------------
# More than 2^31 elements: max_pool2d
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.large
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("kernel_size", "stride", "padding", "ceil_mode"),
    [(3, 2, 1, True), (2, 1, 0, False)],
    ids=["3x3_stride2", "2x2_stride1"],
)
def test_max_pool2d_more_than_2_31_elements(channels_last, kernel_size, stride, padding, ceil_mode):
    """Input and grad_input of 64 x 32 x 1026 x 1025 (2^31 + 6.3e6 elements) in float16, NCHW or
    channels_last; with 2x2 windows at stride 1 the output and grad_output pass 2^31 too. Every
    two images against mtlcore.reference (float32) on those images: the quantized values tie
    often (the first maximum takes the gradient), are exact in float16, and so are the sums of
    the at most four overlapping windows' gradients, so both sides agree bit for bit."""
    require_free_memory(28)
    n, c, h, w = 64, 32, 1026, 1025
    dtype = torch.float16
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator(device="cuda").manual_seed(5)
    if channels_last:  # filled as [N, H, W, C], seen as [N, C, H, W]
        x = quantized((n, h, w, c), gen, dtype).permute(0, 3, 1, 2)
    else:
        x = quantized((n, c, h, w), gen, dtype)
    assert x.numel() > 2**31 and x.is_contiguous(memory_format=fmt)
    x.requires_grad_()
    pool = (kernel_size, stride, padding, 1, ceil_mode)
    out = ops.max_pool2d(x, *pool)
    grad_out = quantized(out.shape, gen, dtype)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    out = out.detach()
    assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)

    for i in range(0, n, 2):
        images = slice(i, i + 2)
        xr = x.detach()[images].float().requires_grad_()
        ref = reference.max_pool2d(xr, *pool)
        assert torch.equal(out[images], ref.half()), f"output of images {i}, {i + 1}"
        (rx,) = torch.autograd.grad(ref, xr, grad_out[images].float())
        assert torch.equal(gx[images], rx.half()), f"grad_input of images {i}, {i + 1}"
        del xr, ref, rx


# ------------------------------------------------------------------------------------------
# Convolution grids beyond one launch, and the CUDA convolution's coordinate limits
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    ("input_shape", "weight_shape", "groups"),
    [
        ((2, 2 * 65537, 3, 3), (65537, 2, 1, 1), 65537),  # gridDim.z: more than 65535 groups
        ((1, 1, 2, 2), (65535 * 64 + 1, 1, 1, 1), 1),  # gridDim.y: more than 65535 row tiles
    ],
    ids=["groups", "row_tiles"],
)
def test_conv2d_act_grid_larger_than_one_launch(input_shape, weight_shape, groups):
    """GEMM convolutions whose grid exceeds gridDim.y or gridDim.z, forward and backward, against
    the same 1x1 convolution written as an einsum in float64 on the CPU (F.conv2d takes minutes
    over 65537 groups there); exact here: quantized values, few products."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = quantized(input_shape, gen, torch.float32).requires_grad_()
    weight = quantized(weight_shape, gen, torch.float32).requires_grad_()
    bias = quantized(weight_shape[:1], gen, torch.float32, offset=1 / 512).requires_grad_()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the fp32 FMA kernel, forward and backward
    try:
        out = ops.conv2d_act(x, weight, bias, groups=groups, activation="relu")
        grad_out = quantized(out.shape, gen, torch.float32)
        got = [out, *torch.autograd.grad(out, (x, weight, bias), grad_out)]
    finally:
        torch.backends.cudnn.allow_tf32 = tf32

    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, weight, bias)]
    xr, wr, br = leaves
    n, c, h, w = xr.shape
    k = wr.shape[0]
    z = torch.einsum(
        "ngchw,gkc->ngkhw",
        xr.view(n, groups, c // groups, h, w),
        wr.view(groups, k // groups, c // groups),
    )
    ref = torch.relu(z.reshape(n, k, h, w) + br.view(1, k, 1, 1))
    want = [ref, *torch.autograd.grad(ref, leaves, grad_out.cpu().double())]
    for name, a, b in zip(
        ("output", "grad_input", "grad_weight", "grad_bias"), got, want, strict=True
    ):
        torch.testing.assert_close(a.detach().cpu().double(), b, rtol=1e-6, atol=0, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(stride=2**30), r"stride below 2\^30"),
        (dict(dilation=2**30), r"dilation below 2\^30"),
        (dict(stride=2**29, padding=2**29), r"height and width plus padding below 2\^30"),
    ],
    ids=["stride", "dilation", "padding"],
)
def test_conv2d_act_cuda_coordinate_limits_name_the_argument(kwargs, match):
    """The CUDA kernels keep coordinates in 32 bits: larger ones are a ValueError naming the
    argument, never a wrong answer."""
    x = torch.zeros(1, 1, 3, 3, device="cuda")
    weight = torch.zeros(1, 1, 1, 1, device="cuda")
    with pytest.raises(ValueError, match=match):
        ops.conv2d_act(x, weight, **kwargs)


# ------------------------------------------------------------------------------------------
# Determinism: torch.use_deterministic_algorithms(True), two runs, the same bits
# ------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) during the test (restored afterwards). Tensors
    from torch.empty are then filled with NaN, so an element a kernel forgets to write shows."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def assert_same_bits(first: list[torch.Tensor], second: list[torch.Tensor], names) -> None:
    assert len(first) == len(second) == len(names)
    for name, a, b in zip(names, first, second, strict=True):
        a, b = a.detach(), b.detach()
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} is not finite"
        bits_a = a.reshape(-1).view(torch.uint8)
        bits_b = b.reshape(-1).view(torch.uint8)
        assert torch.equal(bits_a, bits_b), f"{name} differs from run to run"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    ("dtype", "tf32"),
    [
        (torch.float32, False),
        (torch.float32, True),
        (torch.float64, False),
        (torch.float16, False),
        (torch.bfloat16, False),
    ],
    ids=["float32", "tf32", "float64", "float16", "bfloat16"],
)
@pytest.mark.parametrize("groups", [1, 2, 16], ids=["dense", "grouped", "depthwise"])
def test_deterministic_conv2d_act(deterministic, dtype, tf32, groups):
    """Forward and all three gradients, with the weight gradient's depth split over blocks."""

    def run():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 16, 33, 35, generator=gen).to("cuda", dtype).requires_grad_()
        weight = torch.randn(32, 16 // groups, 3, 3, generator=gen) / (16 * 9 / groups) ** 0.5
        weight = weight.to("cuda", dtype).requires_grad_()
        bias = torch.randn(32, generator=gen).to("cuda", dtype).requires_grad_()
        out = ops.conv2d_act(x, weight, bias, 1, 1, 1, groups, "gelu")
        grad_out = torch.randn(out.shape, generator=gen).to(out)
        return [out, *torch.autograd.grad(out, (x, weight, bias), grad_out)]

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        first, second = run(), run()
    finally:
        torch.backends.cudnn.allow_tf32 = old
    assert_same_bits(first, second, ["output", "grad_input", "grad_weight", "grad_bias"])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_deterministic_max_pool2d(deterministic, dtype):
    """Forward and grad_input, NCHW, channels_last and a strided view, for overlapping windows
    (several gradients add up in one element) and values that tie."""

    def run():
        gen = torch.Generator().manual_seed(0)
        x = (torch.randint(-8, 9, (4, 70, 33, 35), generator=gen) / 4).to("cuda", dtype)
        results = []
        for view in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, ::2]):
            view = view.detach().requires_grad_()
            for pool in ((3, 2, 1, 1, True), (3, 1, 1, 2, False), (2, 2, 0, 1, False)):
                out = ops.max_pool2d(view, *pool)
                grad_out = torch.randn(out.shape, generator=gen).to(out)
                results += [out, *torch.autograd.grad(out, view, grad_out)]
        return results

    names = [
        f"{what} of {view} {pool}"
        for view in ("nchw", "channels_last", "strided")
        for pool in ("3x3 stride 2", "3x3 dilation 2", "2x2 stride 2")
        for what in ("output", "grad_input")
    ]
    assert_same_bits(run(), run(), names)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_deterministic_multitask_loss(deterministic, dtype):
    """Every kind and ce mode in one call (tasks of several work items each), learnable weights
    and relation, gradients flowing into total and per_task."""
    specs = [
        ("ce", (5000, 10)),  # a thread per row
        ("ce", (700, 300)),  # a warp per row
        ("ce", (40, 3000)),  # the block per row
        ("ce", (3, 5, 17, 19)),  # dense
        ("bce", (2000, 40)),
        ("mse", (1000, 33)),  # a row-strided head
        ("l1", (600, 7, 3)),
    ]

    def run():
        gen = torch.Generator().manual_seed(0)
        logits, targets, leaves = [], [], []
        for kind, shape in specs:
            if kind == "mse":
                leaf = torch.randn(shape[0], shape[1] + 7, generator=gen)
                leaf = leaf.to("cuda", dtype).requires_grad_()
                x = leaf[:, : shape[1]]
            else:
                leaf = x = torch.randn(shape, generator=gen).to("cuda", dtype).requires_grad_()
            if kind == "ce":
                y_shape = (shape[0], *shape[2:])
                y = torch.randint(shape[1], y_shape, generator=gen)
                y[torch.rand(y_shape, generator=gen) < 0.1] = -100
            else:
                y = (
                    torch.rand(shape, generator=gen)
                    if kind == "bce"
                    else torch.randn(shape, generator=gen)
                )
                y[torch.rand(shape, generator=gen) < 0.1] = float("nan")
            logits.append(x)
            targets.append(y.to("cuda", dtype if kind != "ce" else torch.long))
            leaves.append(leaf)
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        weights = torch.rand(len(specs), generator=gen).to("cuda", loss_dtype).requires_grad_()
        relation = torch.randn(len(specs), len(specs), generator=gen)
        relation = relation.to("cuda", loss_dtype).requires_grad_()
        kinds = [kind for kind, _ in specs]
        total, per_task = ops.multitask_loss(
            logits, targets, kinds, weights, relation, label_smoothing=0.1
        )
        mix = torch.randn(len(specs), generator=gen).to(per_task)
        grads = torch.autograd.grad(total + (mix * per_task).sum(), [*leaves, weights, relation])
        return [total, per_task, *grads]

    names = ["total", "per_task", *(f"grad of {k}" for k, _ in specs), "grad_weights"]
    assert_same_bits(run(), run(), [*names, "grad_relation"])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
def test_deterministic_sgd_and_adam(deterministic, dtype):
    """sgd_ (nesterov, grad_scale) then adam_ (amsgrad, decoupled weight decay) over groups of
    several chunks, a 0-d and an empty tensor and a misaligned view (the scalar path)."""
    shapes = [(1,), (7,), (300_001,), (33, 17), (), (0,)]

    def run():
        gen = torch.Generator().manual_seed(0)

        def make(uniform=False):
            draw = torch.rand if uniform else torch.randn
            ts = [draw(s, generator=gen).to("cuda", dtype) for s in shapes]
            ts[2] = torch.cat([ts[2][:1], ts[2]])[1:]  # one element into its storage
            return ts

        params, grads, bufs = make(), make(), make()
        scale = torch.tensor(2.0, device="cuda")
        ops.sgd_(
            params,
            grads,
            bufs,
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.01,
            grad_scale=scale,
        )
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs = make(), make(True), make(True)
        steps = [torch.tensor(float(i + 1), device="cuda") for i in range(len(shapes))]
        ops.adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            lr=1e-2,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            amsgrad=True,
            decoupled_weight_decay=True,
        )
        return [*params, *grads, *bufs, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs]

    lists = ["params", "grads", "momentum_buffers", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    names = [f"{name}[{i}]" for name in lists for i in range(len(shapes))]
    assert_same_bits(run(), run(), names)
