"""Property-based fuzzing of every op against mtlcore.reference (hypothesis).

Hypothesis draws the structure of each case (shapes, strides, hyperparameters, where the
extreme values go); the tensor values come from a seeded torch generator, so a failing case
shrinks to a small, readable example and replays exactly.

Profiles (chosen with HYPOTHESIS_PROFILE, registered in conftest.py): ``ci`` (default: fixed
seed, bounded number of examples, part of ``make test``) and ``long`` (``make fuzz``: random
seed, many more examples).

What is checked:
- conv2d_act: output and input/weight/bias gradients vs act(F.conv2d(...)) in float64; float32
  within a bound scaled by sum |x| |w| of each output, and its three gradients (through the
  identity activation) within their sums' rounding bounds; NaN/Inf inputs give NaN/Inf
  exactly where the functional does; geometry the functional rejects is rejected too. One
  case in four has 1-64 channels per group (the CPU paths for channels that fill the vectors).
- multitask_loss: total, per_task and the gradients of logits, weights and relation vs the
  reference in float64; ±1e30, subnormal, NaN and Inf logits; ignored / missing labels, empty
  batches, one class, huge class counts, non-contiguous views.
- sgd_ / adam_: updated tensors vs the reference for random hyperparameters and lists,
  including empty tensors, non-contiguous parameters, NaN/Inf gradients and skipped steps, and
  (one list in four) a tensor large enough for the CPU ops to split the lists over threads.
- max_pool2d: output equal (NaN included) to F.max_pool2d's and bit for bit the reference's
  (signed zeros included, NaN payloads aside), the gradient exactly the reference's and
  F.max_pool2d's (where every window holds an input element), and the output layout, for
  random geometry (ceil_mode, dilation, 1x1 and empty-batch inputs, unbatched), layouts and
  dtypes; ties, ±1e30, subnormals, signed zeros, NaN and Inf; geometry the functional rejects
  is rejected too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from mtlcore import ops, reference

SPECIALS = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "huge": 1e30,
    "-huge": -1e30,
    "subnormal": 1e-310,  # float64 subnormal; float32 flushes to 0 / keeps 1e-40 below
    "subnormal32": 1e-40,
    "zero": 0.0,
}


def values(shape, dtype, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def inject(
    t: torch.Tensor, specials: list[tuple[float, str]], table: dict[str, float] = SPECIALS
) -> torch.Tensor:
    """Writes each (position fraction, name) special value of ``table`` into the flattened
    ``t``."""
    if t.numel() == 0:
        return t
    flat = t.reshape(-1)
    for frac, name in specials:
        flat[min(int(frac * t.numel()), t.numel() - 1)] = table[name]
    return flat.view(t.shape)


def layout(t: torch.Tensor, kind: str, device: str = "cpu") -> torch.Tensor:
    """A copy of ``t`` on ``device`` in the memory layout ``kind``."""
    t = t.to(device, copy=True)
    if kind == "misaligned":
        # contiguous, but one element past an aligned address (no aligned vector loads)
        out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        return out.copy_(t)
    if kind == "contiguous" or t.dim() < 2:
        return t
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        # every other element of a twice-as-wide buffer along the last dimension
        shape = (*t.shape[:-1], 2 * t.shape[-1])
        big = torch.full(shape, math.nan, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def leaves_of(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors if t is not None]


LAYOUTS = st.sampled_from(["contiguous", "channels_last", "strided", "transposed", "misaligned"])
special_lists = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(sorted(SPECIALS))), max_size=3
)


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN where expected is NaN, the same infinities, finite elsewhere."""
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN positions differ"
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf), "Inf positions differ"
    assert torch.equal(actual[inf], expected[inf]), "signs of Inf differ"


# --------------------------------------------------------------------------------------------
# conv2d_act
# --------------------------------------------------------------------------------------------


# Channels per group of the "wide" cases: the CPU kernels' paths for channels that fill their
# vectors (the channel-vectorised GEMM, the direct weight gradient: 16 and 32 channels of float32
# on AVX-512, 8 and 16 on AVX2, half that for float64) and their partly filled last panels.
WIDE_CHANNELS = [1, 3, 8, 15, 16, 17, 24, 31, 32, 33, 48, 64]


@st.composite
def conv_cases(draw):
    # One case in four has wide layers (and fewer groups and smaller kernels, to stay quick).
    wide = draw(st.integers(0, 3)) == 0
    groups = draw(st.integers(1, 2 if wide else 3))
    if wide:
        c, k = draw(st.sampled_from(WIDE_CHANNELS)), draw(st.sampled_from(WIDE_CHANNELS))
        extent = 3
    else:
        c, k = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        extent = 4
    case = {
        "n": draw(st.integers(0, 5)),  # >= 4 image-group jobs reach the CPU columns path
        "c": groups * c,
        "k": groups * k,
        "groups": groups,
        "h": draw(st.integers(1, 9)),
        "w": draw(st.integers(1, 9)),
        "r": draw(st.integers(1, extent)),
        "s": draw(st.integers(1, extent)),
        "stride": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "dilation": (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        "bias": draw(st.booleans()),
        "activation": draw(st.sampled_from(ops.ACTIVATIONS)),
        "negative_slope": draw(st.sampled_from([0.01, 0.0, 0.2, 1.0, -0.5, 3.0])),
        "input_layout": draw(LAYOUTS),
        "weight_layout": draw(LAYOUTS),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "scale": draw(st.sampled_from([1.0, 1e-3, 30.0, 1e-20])),
    }
    padding = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if padding == "same":
        case["stride"] = (1, 1)
        case["padding"] = "same"
    elif padding == "valid":
        case["padding"] = "valid"
    elif padding == "int":
        case["padding"] = draw(st.integers(0, 2))
    else:
        case["padding"] = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    return case


def conv_tensors(case, dtype):
    x = values((case["n"], case["c"], case["h"], case["w"]), dtype, case["seed"], case["scale"])
    w = values(
        (case["k"], case["c"] // case["groups"], case["r"], case["s"]), dtype, case["seed"] + 1, 0.5
    )
    b = values((case["k"],), dtype, case["seed"] + 2, 0.5) if case["bias"] else None
    return x, w, b


def conv_geometry(case):
    """F.conv2d's keyword arguments of the case."""
    return dict(
        stride=case["stride"],
        padding=case["padding"],
        dilation=case["dilation"],
        groups=case["groups"],
    )


def conv_args(case):
    return conv_geometry(case) | dict(
        activation=case["activation"], negative_slope=case["negative_slope"]
    )


def conv_reference_or_error(x, w, b, case):
    try:
        return reference.conv2d_act(x, w, b, **conv_args(case)), None
    except RuntimeError as e:
        return None, e


@pytest.mark.parametrize("device", DEVICES)
@given(case=conv_cases())
def test_conv2d_act_float64_matches_reference(device, case):
    x, w, b = conv_tensors(case, torch.float64)
    xd = layout(x, case["input_layout"], device)
    wd = layout(w, case["weight_layout"], device)
    bd = None if b is None else b.to(device, copy=True)
    leaves, dleaves = leaves_of(x, w, b), leaves_of(xd, wd, bd)
    expected, error = conv_reference_or_error(x, w, b, case)
    if error is not None:
        note(f"F.conv2d rejects it: {error}")
        with pytest.raises((RuntimeError, ValueError)):
            ops.conv2d_act(xd, wd, bd, **conv_args(case))
        return
    out = ops.conv2d_act(xd, wd, bd, **conv_args(case))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-12)
    gy = values(out.shape, torch.float64, case["seed"] + 3, 1.0)
    got = torch.autograd.grad(out, dleaves, gy.to(device))
    want = torch.autograd.grad(expected, leaves, gy)
    for name, g, e in zip(("input", "weight", "bias"), got, want, strict=False):
        torch.testing.assert_close(
            g.cpu(), e, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@given(case=conv_cases(), specials=special_lists)
def test_conv2d_act_float32_within_bound_and_nonfinite_propagate(device, case, specials):
    x, w, b = conv_tensors(case, torch.float32)
    x = inject(x, specials)
    xd = layout(x, case["input_layout"], device)
    wd = layout(w, case["weight_layout"], device)
    bd = None if b is None else b.to(device)
    x64, w64 = x.double(), w.double()
    b64 = b.double() if b is not None else None
    expected, error = conv_reference_or_error(x64, w64, b64, case)
    # CUDA: full float32 products (no TF32), the precision this bound is written for.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        if error is not None:
            with pytest.raises((RuntimeError, ValueError)):
                ops.conv2d_act(xd, wd, bd, **conv_args(case))
            return
        out = ops.conv2d_act(xd, wd, bd, **conv_args(case)).cpu()
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # The float64 result rounded to float32 is where it may overflow to Inf (1e30 * w).
    expected32 = expected.float()
    assert_same_nonfinite(out, expected32)
    # Error bound: the sum may lose ~ K eps sum |x| |w| (activations are 1-Lipschitz up to
    # max(1, |slope|)), and the float32 activation itself a few ulp of its result.
    ab = F.conv2d(
        x64.abs().nan_to_num(posinf=0.0),
        w64.abs(),
        None if b64 is None else b64.abs(),
        **conv_geometry(case),
    )
    lipschitz = max(1.0, abs(case["negative_slope"])) * 1.2
    terms = w.shape[1] * w.shape[2] * w.shape[3] + 1
    bound = lipschitz * (terms * 2**-22 * ab + 1e-37) + 2**-20 * expected.abs()
    finite = expected32.isfinite()
    err = (out.double() - expected)[finite].abs()
    assert bool((err <= bound[finite]).all()), f"max excess {(err - bound[finite]).max()}"


@pytest.mark.parametrize("device", DEVICES)
@given(case=conv_cases())
def test_conv2d_act_float32_gradients_within_bound(device, case):
    """The float32 backward kernels (float64 ones above) through the identity activation, so
    that G is grad_output itself: each gradient within its summation's rounding bound of the
    float64 gradients of the same float32 inputs."""
    x, w, b = conv_tensors(case, torch.float32)
    x64, w64 = x.double(), w.double()
    b64 = None if b is None else b.double()
    args = conv_args(case) | {"activation": "identity"}
    if conv_reference_or_error(x64, w64, b64, case)[1] is not None:
        return  # the bad shapes are the properties' above
    xd = layout(x, case["input_layout"], device)
    wd = layout(w, case["weight_layout"], device)
    bd = None if b is None else b.to(device, copy=True)
    leaves = leaves_of(xd, wd, bd)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out = ops.conv2d_act(xd, wd, bd, **args)
        gy = values(out.shape, torch.float32, case["seed"] + 3, 1.0)
        got = torch.autograd.grad(out, leaves, gy.to(device))
    g64 = gy.double()

    def grads(xv, wv, gv):
        xv, wv = xv.detach().requires_grad_(), wv.detach().requires_grad_()
        return torch.autograd.grad(F.conv2d(xv, wv, None, **conv_geometry(case)), [xv, wv], gv)

    want = grads(x64, w64, g64)
    # sum |G| |W| over each input element's terms, sum |G| |X| over each weight's
    bound_x = grads(x64, w64.abs(), g64.abs())[0]
    bound_w = grads(x64.abs(), w64, g64.abs())[1]
    terms_x = w.shape[0] // case["groups"] * w.shape[2] * w.shape[3]
    terms_w = out.shape[0] * out.shape[2] * out.shape[3]
    checks = [
        ("input", got[0], want[0], bound_x, terms_x),
        ("weight", got[1], want[1], bound_w, terms_w),
    ]
    if b is not None:
        checks.append(("bias", got[2], g64.sum((0, 2, 3)), g64.abs().sum((0, 2, 3)), terms_w))
    for name, g, e, ab, terms in checks:
        assert g.dtype == torch.float32 and g.shape == e.shape, name
        err = (g.cpu().double() - e).abs()
        bound = (terms + 1) * 2**-22 * ab + 1e-37
        assert bool((err <= bound).all()), f"{name}: max excess {(err - bound).max()}"


# --------------------------------------------------------------------------------------------
# multitask_loss
# --------------------------------------------------------------------------------------------

LOSS_KINDS = ops.LOSS_KINDS


@st.composite
def loss_tasks(draw):
    batch = draw(st.integers(0, 5))
    tasks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(LOSS_KINDS))
        dense = draw(st.booleans())
        spatial = (draw(st.integers(1, 4)), draw(st.integers(1, 3))) if dense else ()
        if kind == "ce":
            classes = draw(st.sampled_from([1, 2, 3, 7, 33, 100, 3000, 70000]))
            if classes > 100:
                spatial = ()  # keep huge class counts to [B, C]
        else:
            classes = draw(st.integers(1, 5))
        tasks.append(
            {
                "kind": kind,
                "shape": (batch, classes, *spatial),
                "missing": draw(st.floats(0, 1)),
                "layout": draw(
                    st.sampled_from(["contiguous", "strided", "transposed", "misaligned"])
                ),
                "specials": draw(special_lists) if draw(st.integers(0, 3)) == 0 else [],
                "scale": draw(st.sampled_from([1.0, 5.0, 1e-3, 60.0])),
                # ce logits far from 0: label smoothing's mean - max must not cancel away.
                "offset": draw(st.sampled_from([0.0, 0.0, 1e4, -3e3])) if kind == "ce" else 0.0,
            }
        )
    t = len(tasks)
    return {
        "tasks": tasks,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "weights": draw(st.booleans()),
        "relation": draw(st.booleans()),
        "ignore_index": draw(st.sampled_from([-100, 0, 1, -1])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "n": t,
    }


def loss_inputs(case, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    logits, targets = [], []
    for task in case["tasks"]:
        shape = task["shape"]
        x = torch.randn(shape, generator=g, dtype=torch.float64) * task["scale"] + task["offset"]
        x = inject(x.to(dtype), task["specials"])
        missing = torch.rand(shape[:1] + shape[2:], generator=g) < task["missing"]
        if task["kind"] == "ce":
            y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
            y[missing] = case["ignore_index"]
        else:
            y = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
            if task["kind"] != "bce":
                y = y * 4 - 2
            y[torch.rand(shape, generator=g) < task["missing"]] = math.nan
        logits.append(x)
        targets.append(y)
    w = torch.rand(case["n"], generator=g, dtype=torch.float64) * 2 if case["weights"] else None
    r = torch.randn(case["n"], case["n"], generator=g, dtype=torch.float64) * 0.3
    r = r if case["relation"] else None
    if dtype != torch.float64:
        w = w.float() if w is not None else None
        r = r.float() if r is not None else None
    return logits, targets, w, r


def on_device(case, logits, targets, w, r, device):
    """Copies of loss_inputs' tensors on ``device``, the logits in each task's layout."""
    logits = [layout(x, t["layout"], device) for x, t in zip(logits, case["tasks"], strict=True)]
    targets = [y.to(device, copy=True) for y in targets]
    w = None if w is None else w.to(device, copy=True)
    r = None if r is None else r.to(device, copy=True)
    return logits, targets, w, r


@pytest.mark.parametrize("device", DEVICES)
@given(case=loss_tasks())
def test_multitask_loss_float64_matches_reference(device, case):
    kinds = [t["kind"] for t in case["tasks"]]
    kw = {"ignore_index": case["ignore_index"], "label_smoothing": case["label_smoothing"]}
    logits, targets, w, r = loss_inputs(case, torch.float64)
    dlogits, dtargets, dw, dr = on_device(case, logits, targets, w, r, device)
    nonfinite = any(t["specials"] for t in case["tasks"])
    leaves, dleaves = leaves_of(*logits, w, r), leaves_of(*dlogits, dw, dr)
    total, per_task = ops.multitask_loss(dlogits, dtargets, kinds, dw, dr, **kw)
    ref_total, ref_per_task = reference.multitask_loss(logits, targets, kinds, w, r, **kw)
    total, per_task = total.cpu(), per_task.cpu()
    if nonfinite:
        assert_same_nonfinite(per_task.detach(), ref_per_task.detach())
        assert_same_nonfinite(total.detach().view(1), ref_total.detach().view(1))
        finite = ref_per_task.isfinite()
        torch.testing.assert_close(per_task[finite], ref_per_task[finite], rtol=1e-9, atol=1e-12)
        return
    torch.testing.assert_close(per_task, ref_per_task, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-9, atol=1e-12)
    # Gradients through total and per_task at once.
    g = torch.Generator().manual_seed(case["seed"] + 1)
    gp = torch.randn(case["n"], generator=g, dtype=torch.float64)
    got = torch.autograd.grad((total, per_task), dleaves, (torch.tensor(1.5).double(), gp))
    want = torch.autograd.grad((ref_total, ref_per_task), leaves, (torch.tensor(1.5).double(), gp))
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            a.cpu(), b, rtol=1e-8, atol=1e-11, msg=lambda m, i=i: f"leaf {i}: {m}"
        )


@pytest.mark.parametrize("device", DEVICES)
@given(case=loss_tasks())
def test_multitask_loss_float32_matches_float64_reference(device, case):
    kinds = [t["kind"] for t in case["tasks"]]
    kw = {"ignore_index": case["ignore_index"], "label_smoothing": case["label_smoothing"]}
    logits, targets, w, r = loss_inputs(case, torch.float32)
    dlogits, dtargets, dw, dr = on_device(case, logits, targets, w, r, device)
    total, per_task = ops.multitask_loss(dlogits, dtargets, kinds, dw, dr, **kw)
    total, per_task = total.cpu(), per_task.cpu()
    as64 = [x.double() for x in logits]
    targets64 = [y.double() if y.is_floating_point() else y for y in targets]
    w64 = w.double() if w is not None else None
    r64 = r.double() if r is not None else None
    ref_total, ref_per_task = reference.multitask_loss(as64, targets64, kinds, w64, r64, **kw)
    assert per_task.dtype == torch.float32
    ref_per_task32 = ref_per_task.float()
    assert_same_nonfinite(per_task, ref_per_task32)
    finite = ref_per_task32.isfinite()
    torch.testing.assert_close(
        per_task[finite], ref_per_task32[finite], rtol=2e-5, atol=1e-6, check_dtype=False
    )
    if bool(finite.all()) and bool(ref_total.float().isfinite()):
        scale = 1.0 + float(
            (ref_per_task.abs() * (1 if w64 is None else w64.abs())).sum()
            + (
                0
                if r64 is None
                else (r64.abs() * ref_per_task.abs().outer(ref_per_task.abs())).sum()
            )
        )
        assert abs(float(total) - float(ref_total)) <= 1e-5 * scale


# --------------------------------------------------------------------------------------------
# sgd_ / adam_
# --------------------------------------------------------------------------------------------


@st.composite
def tensor_lists(draw):
    shapes = draw(
        st.lists(
            st.lists(st.integers(0, 7), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
        )
    )
    # One list in four also holds a large tensor, at a random place: the CPU ops split the
    # lists' elements over the threads only beyond 2^15 per thread, cutting inside tensors.
    if draw(st.integers(0, 3)) == 0:
        big = (draw(st.integers(2**16, 2**17 + 999)),)
        shapes.insert(draw(st.integers(0, len(shapes))), big)
    return {
        "shapes": shapes,
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "param_layout": draw(st.sampled_from(["contiguous", "strided", "misaligned"])),
        "specials": draw(special_lists) if draw(st.integers(0, 3)) == 0 else [],
        "seed": draw(st.integers(0, 2**31 - 1)),
        "grad_scale": draw(st.sampled_from([None, 1.0, 1024.0, 0.5])),
        "found_inf": draw(st.sampled_from([None, 0.0, 1.0])),
    }


def optim_state(case, count: int, device: str):
    """``count`` lists of tensors of case["shapes"] (params first, in case["param_layout"]) on
    ``device``, and contiguous CPU copies for the reference."""
    lists, clones = [], []
    for j in range(count):
        one, ref = [], []
        for i, shape in enumerate(case["shapes"]):
            t = values(shape, case["dtype"], case["seed"] + 101 * i + j, 1.0)
            if j == 3:  # exp_avg_sq and max_exp_avg_sq: non-negative
                t = t.abs()
            if j == 1:
                t = inject(t, case["specials"])
            one.append(layout(t, case["param_layout"] if j == 0 else "contiguous", device))
            ref.append(t)
        lists.append(one)
        clones.append(ref)
    return lists, clones


def scaler_args(case, device="cpu"):
    def one(v):
        return None if v is None else torch.tensor([v], dtype=torch.float32, device=device)

    return {"grad_scale": one(case["grad_scale"]), "found_inf": one(case["found_inf"])}


def assert_lists_equal(got, want, rtol, atol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            a.cpu(), b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m, i=i: f"[{i}]: {m}"
        )


def tolerances(dtype):
    return (1e-12, 1e-14) if dtype == torch.float64 else (2e-6, 1e-7)


@pytest.mark.parametrize("device", DEVICES)
@given(
    case=tensor_lists(),
    lr=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.1, 1.0]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.5]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    is_first_step=st.booleans(),
)
def test_sgd_matches_reference(
    device, case, lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step
):
    if nesterov:
        assume(momentum > 0 and dampening == 0)
    (params, grads, bufs), (rp, rg, rb) = optim_state(case, 3, device)
    kw = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
    )
    if momentum == 0:
        bufs, rb = [], []
    ops.sgd_(params, grads, bufs, **kw, **scaler_args(case, device))
    reference.sgd_(rp, rg, rb, **kw, **scaler_args(case))
    rtol, atol = tolerances(case["dtype"])
    for got, want in ((params, rp), (grads, rg), (bufs, rb)):
        assert_lists_equal(got, want, rtol, atol)


@pytest.mark.parametrize("device", DEVICES)
@given(
    case=tensor_lists(),
    lr=st.sampled_from([0.0, 1e-3, 0.1]),
    beta1=st.sampled_from([0.0, 0.5, 0.9]),
    beta2=st.sampled_from([0.0, 0.9, 0.999]),
    eps=st.sampled_from([0.0, 1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 1e-2]),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    decoupled=st.booleans(),
    steps=st.lists(st.integers(1, 10000), min_size=1, max_size=5),
)
def test_adam_matches_reference(
    device, case, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, steps
):
    (params, grads, m, v, vmax), (rp, rg, rm, rv, rvmax) = optim_state(case, 5, device)
    n = len(params)
    state_steps = [torch.tensor(float(steps[i % len(steps)])) for i in range(n)]
    device_steps = [t.to(device) for t in state_steps]
    kw = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled,
    )
    if not amsgrad:
        vmax, rvmax = [], []
    ops.adam_(params, grads, m, v, vmax, device_steps, **kw, **scaler_args(case, device))
    reference.adam_(rp, rg, rm, rv, rvmax, state_steps, **kw, **scaler_args(case))
    rtol, atol = tolerances(case["dtype"])
    if eps == 0.0:
        atol = max(atol, 1e-6)  # m / sqrt(v) with v ~ 0: both sides divide tiny by tiny
    for got, want in ((params, rp), (grads, rg), (m, rm), (v, rv), (vmax, rvmax)):
        assert_lists_equal(got, want, rtol, atol)


# --------------------------------------------------------------------------------------------
# max_pool2d
# --------------------------------------------------------------------------------------------

# Signed zeros too: the maximum of 0.0 and -0.0 is the first of them (bit for bit).
POOL_SPECIALS = {**SPECIALS, "-zero": -0.0}
# (kernel_size, stride, padding, dilation) drawn often: the common pools (2x2 stride 2 has
# fast CPU loops), and one whose windows miss a small input entirely (-inf, no gradient).
POOL_PRESETS = [(2, None, 0, 1), ((2, 2), 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (2, 1, 1, 2)]


def pool_pair(draw, low: int, high: int) -> int | tuple[int, int]:
    """An int or an (h, w) pair in [low, high], as the op takes either."""
    if draw(st.booleans()):
        return draw(st.integers(low, high))
    return (draw(st.integers(low, high)), draw(st.integers(low, high)))


def as_pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else v


@st.composite
def pool_cases(draw, dtypes, max_specials):
    if draw(st.integers(0, 3)) == 0:
        kernel, stride, padding, dilation = draw(st.sampled_from(POOL_PRESETS))
    else:
        kernel = pool_pair(draw, 1, 4)
        kh, kw = as_pair(kernel)
        stride = None if draw(st.integers(0, 3)) == 0 else pool_pair(draw, 1, 4)
        if draw(st.booleans()):
            padding = draw(st.integers(0, min(kh, kw) // 2))
        else:
            padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
        dilation = pool_pair(draw, 1, 3)
    # Mostly sizes the windows fit in (from the smallest one up), sometimes any size.
    fits = draw(st.integers(0, 5)) != 0
    smallest = [
        max(1, d * (k - 1) + 1 - 2 * p) if fits else 1
        for k, p, d in zip(as_pair(kernel), as_pair(padding), as_pair(dilation), strict=True)
    ]
    more_rows = draw(st.one_of(st.integers(0, 2), st.integers(3, 11)))
    # >= 16 columns: the vector blocks of the CPU 2x2 loops
    more_columns = draw(st.one_of(st.integers(0, 2), st.integers(3, 11), st.integers(12, 39)))
    n = draw(st.integers(0, 4))
    return {
        "n": n,
        # > 64 channels: more than one channel block of the CPU channels_last backward
        "c": draw(st.one_of(st.integers(1, 5), st.integers(6, 70))),
        "h": smallest[0] + more_rows,
        "w": smallest[1] + more_columns,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "ceil_mode": draw(st.booleans()),
        "unbatched": n == 1 and draw(st.booleans()),
        "layout": draw(LAYOUTS),
        "dtype": draw(st.sampled_from(dtypes)),
        "ties": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 1e-3, 30.0, 1e-20, 1e30, 1e-40, 1e-310])),
        "specials": draw(
            st.lists(
                st.tuples(
                    st.floats(0, 1, exclude_max=True), st.sampled_from(sorted(POOL_SPECIALS))
                ),
                max_size=max_specials,
            )
        ),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def pool_args(case):
    return (
        case["kernel_size"],
        case["stride"],
        case["padding"],
        case["dilation"],
        case["ceil_mode"],
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor (NaN payloads and signed zeros included)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def has_empty_window(case) -> bool:
    """Whether some window holds no input element (F.max_pool2d's backward writes out of
    bounds there)."""
    probe = torch.zeros(1, 1, case["h"], case["w"])
    return bool(F.max_pool2d(probe, *pool_args(case)).isinf().any())


def check_max_pool2d(device, case):
    dtype = case["dtype"]
    shape = (case["n"], case["c"], case["h"], case["w"])
    g = torch.Generator().manual_seed(case["seed"])
    if case["ties"]:  # k / 4: many windows hold equal maxima
        k = torch.randint(-6, 7, shape, generator=g, dtype=torch.float64)
        x = (k / 4 * case["scale"]).to(dtype)
    else:
        x = values(shape, dtype, case["seed"], case["scale"])
    x = inject(x, case["specials"], POOL_SPECIALS)
    args = pool_args(case)
    xd = layout(x, case["layout"], device)
    if case["unbatched"]:
        xd = xd[0]
    xd.requires_grad_()
    try:
        want = F.max_pool2d(x, *args)
    except RuntimeError as e:
        note(f"F.max_pool2d rejects it: {e}")
        event("max_pool2d: rejected, as by F.max_pool2d")
        with pytest.raises(ValueError, match="pooled output would be empty"):
            ops.max_pool2d(xd, *args)
        return
    out = ops.max_pool2d(xd, *args)
    assert out.dtype == dtype
    if not case["unbatched"]:
        channels_last = xd.is_contiguous(memory_format=torch.channels_last)
        expected = torch.channels_last if channels_last and not xd.is_contiguous() else None
        assert out.is_contiguous(memory_format=expected or torch.contiguous_format), "layout"
    got = (out.unsqueeze(0) if case["unbatched"] else out).detach().cpu()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ from F.max_pool2d"
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    xr = x.clone().requires_grad_()
    ref = reference.max_pool2d(xr, *args)
    # (bit for bit but for NaN payloads: torch.gather, in the reference, may change those)
    number = ~got.isnan()
    assert torch.equal(got.isnan(), ref.detach().isnan()), "NaN positions differ from reference"
    assert torch.equal(bits(got)[number], bits(ref.detach())[number]), "not the reference's bits"

    # Gradients of +-1/4 and +-3/4: every sum (at most 16 windows share an element) is exact in
    # every dtype, so any summation order gives the same bits.
    gy = ((torch.randint(0, 4, want.shape, generator=g) * 2 - 3) / 4).to(dtype)
    gyd = gy.to(device)
    (gx,) = torch.autograd.grad(out, xd, gyd[0] if case["unbatched"] else gyd)
    assert gx.shape == xd.shape
    gx = (gx.unsqueeze(0) if case["unbatched"] else gx).cpu()
    (gref,) = torch.autograd.grad(ref, xr, gy)
    assert torch.equal(gx, gref), "gradient differs from the reference's"
    if has_empty_window(case):
        event("max_pool2d: a window without input elements (gradient vs the reference only)")
    else:
        xf = x.clone().requires_grad_()
        (gf,) = torch.autograd.grad(F.max_pool2d(xf, *args), xf, gy)
        assert torch.equal(gx, gf), "gradient differs from F.max_pool2d's"


@pytest.mark.parametrize("device", DEVICES)
@given(
    case=pool_cases(
        dtypes=[torch.float64, torch.float32, torch.float16, torch.bfloat16], max_specials=2
    )
)
def test_max_pool2d_matches_reference_and_functional(device, case):
    check_max_pool2d(device, case)


@pytest.mark.parametrize("device", DEVICES)
@given(case=pool_cases(dtypes=[torch.float64, torch.float32], max_specials=12))
def test_max_pool2d_nonfinite_and_extreme_values(device, case):
    """Many NaN, Inf, ±1e30, subnormal and signed-zero elements: windows of NaN only, -inf
    only, NaN next to +inf; the output as F.max_pool2d's (the last NaN of a window wins)."""
    check_max_pool2d(device, case)
