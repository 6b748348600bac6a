"""mtlcore.ops.multitask_loss against the composition of torch's functional losses and against
mtlcore.reference; gradcheck, opcheck, torch.compile, autocast, memory kept for backward,
determinism, the MultiTaskLoss module, and bad input."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA,
    CompiledOnce,
    assert_device_side_assertion,
    assert_double_backward_raises,
    assert_nested_func_grad_raises,
)

from mtlcore import ops, reference
from mtlcore.nn import MultiTaskLoss

KINDS = ops.LOSS_KINDS


@dataclass
class Problem:
    """The op's arguments, plus the leaf tensors the gradients are taken with respect to."""

    logits: list[torch.Tensor]
    targets: list[torch.Tensor]
    kinds: list[str]
    weights: torch.Tensor | None
    relation: torch.Tensor | None
    ignore_index: int
    label_smoothing: float
    leaves: list[torch.Tensor]

    def kwargs(self) -> dict:
        return {"ignore_index": self.ignore_index, "label_smoothing": self.label_smoothing}


def random_problem(seed: int, device: str, dtype=torch.float32) -> Problem:
    """A random mix of 1-8 tasks: kinds, class counts 1-1000, batch 1-1024, dense ce logits,
    row-strided heads (as torch.split of one Linear gives), ignored and NaN labels (including
    tasks with no label at all), label smoothing, weights and an asymmetric relation."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def chance(p: float) -> bool:
        return float(torch.rand(1, generator=g)) < p

    num_tasks = int(torch.randint(1, 9, (1,), generator=g))
    batch = pick([1, 2, 13, 64, 257, 1024])
    ignore_index = pick([-100, 0, 3])
    smoothing = pick([0.0, 0.0, 0.1, 0.35])
    logits, targets, kinds, leaves = [], [], [], []
    for _ in range(num_tasks):
        kind = pick(KINDS)
        missing = chance(0.15)  # a task with no valid label in the batch
        if kind == "ce":
            classes = pick([1, 2, 3, 10, 33, 100, 1000])
            dense = chance(0.3)
            b = min(batch, 4) if dense else max(1, min(batch, 200_000 // classes))
            shape = (b, classes, 5, 3) if dense else (b, classes)
            x = torch.randn(shape, generator=g) * pick([0.5, 3.0])
            y = torch.randint(classes, (b, 5, 3) if dense else (b,), generator=g)
            y[torch.rand(y.shape, generator=g) < 0.2] = ignore_index
            if missing:
                y.fill_(ignore_index)
        else:
            cols = pick([1, 4, 40, 301])
            shape = (batch, cols) if chance(0.8) else (batch, cols, 2)
            x = torch.randn(shape, generator=g) * 2
            y = torch.rand(shape, generator=g) if kind == "bce" else torch.randn(shape, generator=g)
            y[torch.rand(shape, generator=g) < 0.2] = float("nan")
            if missing:
                y.fill_(float("nan"))
        leaf = x.to(device=device, dtype=dtype).requires_grad_()
        head = leaf
        if leaf.dim() == 2 and chance(0.4):  # a row-strided view, as torch.split gives
            head = torch.cat([leaf, torch.zeros_like(leaf[:, :2])], dim=1)[:, : leaf.shape[1]]
        logits.append(head)
        targets.append(y.to(device))
        kinds.append(kind)
        leaves.append(leaf)
    weights = relation = None
    if chance(0.7):
        weights = (torch.rand(num_tasks, generator=g) * 2).to(device).requires_grad_()
        leaves.append(weights)
    if chance(0.7):
        relation = torch.randn(num_tasks, num_tasks, generator=g).to(device).requires_grad_()
        leaves.append(relation)
    return Problem(logits, targets, kinds, weights, relation, ignore_index, smoothing, leaves)


def every_loop_problem(device: str, dtype=torch.float32, smoothing: float = 0.1) -> Problem:
    """One task for each loop of the CPU kernels, every one with labels: ce rows of 33, 100 and
    1000 classes (vector tails of every length mod 4, 8 and 16), ce rows of 10 classes
    (class-major blocks), dense ce, bce, mse and l1; ignored and NaN labels, weights and a
    relation matrix."""
    g = torch.Generator().manual_seed(7)
    shapes = [("ce", (37, 33)), ("ce", (29, 100)), ("ce", (11, 1000)), ("ce", (70, 10))]
    shapes += [("ce", (3, 13, 7, 5)), ("bce", (45, 40)), ("mse", (45, 7)), ("l1", (45, 3, 5))]
    logits, targets, kinds = [], [], []
    for kind, shape in shapes:
        x = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_()
        if kind == "ce":
            y = torch.randint(shape[1], (shape[0], *shape[2:]), generator=g)
            y[torch.rand(y.shape, generator=g) < 0.2] = -100
        else:
            y = torch.rand(shape, generator=g) if kind == "bce" else torch.randn(shape, generator=g)
            y[torch.rand(shape, generator=g) < 0.2] = float("nan")
        logits.append(x)
        targets.append(y.to(device))
        kinds.append(kind)
    t = len(kinds)
    weights = torch.rand(t, generator=g).to(device).requires_grad_()
    relation = (0.1 * torch.randn(t, t, generator=g)).to(device).requires_grad_()
    leaves = [*logits, weights, relation]
    return Problem(logits, targets, kinds, weights, relation, -100, smoothing, leaves)


def functional_per_task(p: Problem) -> torch.Tensor:
    """Each task's loss through torch.nn.functional, with masks for missing labels."""
    losses = []
    for x, y, kind in zip(p.logits, p.targets, p.kinds, strict=True):
        x = x.float()
        if kind == "ce":
            if bool((y != p.ignore_index).any()):
                loss = F.cross_entropy(
                    x, y, ignore_index=p.ignore_index, label_smoothing=p.label_smoothing
                )
            else:
                loss = x.sum() * 0
        else:
            m = ~torch.isnan(y)
            fn = {
                "bce": F.binary_cross_entropy_with_logits,
                "mse": F.mse_loss,
                "l1": F.l1_loss,
            }[kind]
            loss = fn(x[m], y[m].float()) if bool(m.any()) else x.sum() * 0
        losses.append(loss)
    return torch.stack(losses)


def coupled(per_task, weights, relation):
    total = per_task.sum() if weights is None else (weights * per_task).sum()
    if relation is not None:
        total = total + (relation * torch.outer(per_task, per_task)).sum()
    return total


def assert_close(actual, expected, rtol=1e-5, what=""):
    """Relative to the tensor's scale: |a - e| <= rtol * (|e| + max|e|)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected.to(actual.dtype),
        rtol=rtol,
        atol=rtol * max(scale, 1e-12),
        msg=lambda m: f"{what}: {m}",
    )


def run(p: Problem, fn, seed: int = 0):
    """fn's (total, per_task) and the gradients of a combination of both with respect to the
    leaves, so gradients flowing into per_task are checked too."""
    total, per_task = fn(p)
    g = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(per_task.shape, generator=g).to(per_task)
    grads = torch.autograd.grad(total + (mix * per_task).sum(), p.leaves, allow_unused=True)
    return total, per_task, grads


def ours(p: Problem):
    return ops.multitask_loss(p.logits, p.targets, p.kinds, p.weights, p.relation, **p.kwargs())


def ref64(p: Problem):
    """The reference in float64 from the same (fp32) values: an oracle with no rounding of its
    own to speak of."""
    total, per_task = reference.multitask_loss(
        [x.double() for x in p.logits],
        [y.double() if y.is_floating_point() else y for y in p.targets],
        p.kinds,
        None if p.weights is None else p.weights.double(),
        None if p.relation is None else p.relation.double(),
        **p.kwargs(),
    )
    return total, per_task


def functional(p: Problem):
    per_task = functional_per_task(p)
    return coupled(per_task, p.weights, p.relation), per_task


# ------------------------------------------------------------------------------------------
# Values and gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_mixes_match_reference_and_functional(device, seed):
    p = random_problem(seed, device)
    total, per_task, grads = run(p, ours, seed)
    for name, oracle, rtol in (("reference", ref64, 1e-5), ("functional", functional, 2e-5)):
        t_ref, pt_ref, g_ref = run(p, oracle, seed)
        assert total.dtype == per_task.dtype == torch.float32
        assert_close(per_task, pt_ref, rtol, f"per_task vs {name}")
        assert_close(total, t_ref, rtol, f"total vs {name}")
        for i, (a, e) in enumerate(zip(grads, g_ref, strict=True)):
            assert a is not None and e is not None
            assert torch.isfinite(a).all(), f"grad {i} not finite"
            assert_close(a, e, 10 * rtol, f"grad {i} vs {name}")


def test_tasks_without_labels_give_zero_loss_and_zero_gradient(device):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    r = torch.randn(6, 3, device=device, requires_grad=True)
    d = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    labels = torch.full((5,), -100, device=device)
    nan = torch.full((6, 3), float("nan"), device=device)
    dense = torch.full((2, 4, 4), -100, device=device)
    total, per_task = ops.multitask_loss(
        [x, r, r, d], [labels, nan, nan, dense], ["ce", "bce", "l1", "ce"], label_smoothing=0.2
    )
    assert torch.equal(per_task, torch.zeros(4, device=device))
    assert float(total.detach()) == 0.0
    gx, gr, gd = torch.autograd.grad(total + per_task.sum(), [x, r, d])
    for g in (gx, gr, gd):
        assert torch.equal(g, torch.zeros_like(g))


def test_empty_batch(device):
    x = torch.randn(0, 3, device=device, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=device)
    total, per_task = ops.multitask_loss(
        [x, x], [y, torch.zeros(0, 3, device=device)], ["ce", "mse"]
    )
    assert float(total.detach()) == 0.0 and per_task.shape == (2,)
    (g,) = torch.autograd.grad(total, [x])
    assert g.shape == (0, 3)


def test_extreme_logits_are_stable(device):
    x = torch.tensor([[1e4, -1e4, 0.0], [-3e38, 3e38, 1.0]], device=device, requires_grad=True)
    y = torch.tensor([1, 1], device=device)
    b = torch.tensor([[80.0, -80.0, 200.0]], device=device, requires_grad=True)
    t = torch.tensor([[1.0, 0.0, 0.5]], device=device)
    total, per_task = ops.multitask_loss([x, b], [y, t], ["ce", "bce"])
    ref_total, ref_pt = reference.multitask_loss(
        [x.double(), b.double()], [y, t.double()], ["ce", "bce"]
    )
    assert torch.isfinite(per_task).all()
    torch.testing.assert_close(per_task.double(), ref_pt, rtol=1e-6, atol=0)
    g, gb = torch.autograd.grad(total, [x, b])
    gr, gbr = torch.autograd.grad(ref_total, [x, b])
    torch.testing.assert_close(g, gr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gb, gbr, rtol=1e-6, atol=1e-7)


def test_nan_logits_propagate_like_torch(device):
    x = torch.tensor([[0.0, float("nan")], [1.0, 2.0]], device=device)
    y = torch.tensor([0, 1], device=device)
    _, per_task = ops.multitask_loss([x, x], [y, torch.zeros(2, 2, device=device)], ["ce", "mse"])
    assert torch.isnan(per_task).all()
    assert torch.isnan(F.cross_entropy(x, y)) and torch.isnan(F.mse_loss(x, torch.zeros_like(x)))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", [(5, 3), (5, 100), (5, 2000), (5, 3, 4)])
def test_infinite_logits_like_torch(device, shape, smoothing):
    """A ce position with a +inf logit has a NaN loss and gradient, as in F.cross_entropy (its
    log-sum-exp forms inf - inf); -inf logits (masked classes) leave the others finite. The
    shapes reach each CUDA work mode: a thread per position (few classes, dense), a warp per
    row and a block per row."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randint(shape[1], (shape[0], *shape[2:]), generator=g).to(device)
    x[1, 2] = float("inf")
    x[3, 0] = -float("inf")
    y[3] = 1
    x.requires_grad_()
    total, _ = ops.multitask_loss([x], [y], ["ce"], label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(total, [x])
    x_ref = x.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(x_ref, y.cpu(), label_smoothing=smoothing)
    (grad_ref,) = torch.autograd.grad(ref, [x_ref])
    assert torch.isnan(total) and torch.isnan(ref)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, rtol=1e-5, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("classes", [2, 8, 16, 31, 32, 33])
def test_ce_rows_over_several_blocks(device, classes):
    """[B, C] rows with a batch of several of the CPU's class-major blocks (2048 rows for up to
    8 classes, 1024 for 16, 512 for 32; above 32 classes rows run one at a time), ignored labels
    and label smoothing: loss and gradient as F.cross_entropy's, read from a row-strided view."""
    g = torch.Generator().manual_seed(classes)
    batch = 4103
    x = torch.randn(batch, classes + 3, generator=g)[:, 1 : classes + 1].to(device)
    y = torch.randint(classes, (batch,), generator=g)
    y[torch.rand(batch, generator=g) < 0.1] = -100
    x.requires_grad_()
    total, _ = ops.multitask_loss([x], [y.to(device)], ["ce"], label_smoothing=0.1)
    (grad,) = torch.autograd.grad(total, [x])
    x_ref = x.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(x_ref, y, label_smoothing=0.1)
    (grad_ref,) = torch.autograd.grad(ref, [x_ref])
    torch.testing.assert_close(total.cpu().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("classes", range(1, 18))
def test_dense_ce_for_every_small_class_count(device, classes, smoothing):
    """Dense ce with 1-17 classes (the CPU runs 1-16 through kernels compiled for each count,
    17 through the class-major blocks): 1517 positions per image, so an image spans several
    work items, with whole vectors and tails; ignored labels, one of them at a NaN logit (its
    gradient is 0, the others finite), and a -inf logit. Loss and gradient as
    F.cross_entropy's in float64."""
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(2, classes, 37, 41, generator=g) * 3
    y = torch.randint(classes, (2, 37, 41), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.1] = -100
    y[1, 5, 7] = -100
    x[1, 0, 5, 7] = float("nan")
    if classes > 1:
        x[0, classes - 1, 30, 40] = -float("inf")
        y[0, 30, 40] = 0
    leaf = x.to(device).requires_grad_()
    total, _ = ops.multitask_loss([leaf], [y.to(device)], ["ce"], label_smoothing=smoothing)
    (grad,) = torch.autograd.grad(total, [leaf])
    x_ref = x.double().nan_to_num(nan=0.0, neginf=-float("inf")).requires_grad_()
    ref = F.cross_entropy(x_ref, y, label_smoothing=smoothing)
    (grad_ref,) = torch.autograd.grad(ref, [x_ref])
    if classes > 1 and smoothing > 0:  # the smoothing term of a -inf logit: an inf loss
        assert math.isinf(float(total)) and math.isinf(float(ref))
    else:
        torch.testing.assert_close(total.cpu().double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, rtol=1e-5, atol=1e-9)
    assert torch.equal(grad[1, :, 5, 7].cpu(), torch.zeros(classes))
    """Dense logits [B, C, 0] hold no position: loss 0 and an empty gradient, for every class
    count (the CUDA kernel plans rows differently above 16 classes)."""
    x = torch.randn(2, classes, 0, device=device, requires_grad=True)
    y = torch.zeros(2, 0, dtype=torch.long, device=device)
    b = torch.randn(3, 2, device=device, requires_grad=True)
    total, per_task = ops.multitask_loss(
        [x, b], [y, torch.ones(3, 2, device=device)], ["ce", "bce"]
    )
    assert float(per_task[0]) == 0.0
    torch.testing.assert_close(
        per_task[1], F.binary_cross_entropy_with_logits(b, torch.ones_like(b))
    )
    gx, gb = torch.autograd.grad(total, [x, b])
    assert gx.shape == x.shape and torch.isfinite(gb).all()


@pytest.mark.parametrize("problem", ["random", "every_loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits(device, dtype, problem):
    """fp16/bf16 logits are read as they are; the math is fp32, so the losses equal fp32 math on
    the same values, and the gradient is within two roundings to the logits' dtype."""
    if problem == "random":
        p = random_problem(3, device, dtype)
    else:
        p = every_loop_problem(device, dtype)
    _total, per_task, grads = run(p, ours)
    assert per_task.dtype == torch.float32
    _t_ref, pt_ref, g_ref = run(p, ref64)
    assert_close(per_task, pt_ref, 1e-5, "per_task")
    eps = torch.finfo(dtype).eps
    for a, e in zip(grads[: len(p.logits)], g_ref, strict=False):
        assert a.dtype == dtype
        assert_close(a.float(), e.float(), 2 * eps, "grad")


def test_half_precision_mse_gradient_of_large_differences(device):
    """An fp16 mse gradient is finite whenever x - y and the result are: 2 (x - y) = 80000 is
    beyond fp16, but 2 (x - y) / 8 = 10000 is not (the kernels keep x - y, and the factor 2
    with the 1 / count, for the backward)."""
    x = torch.full((2, 4), 20000.0, dtype=torch.float16, device=device, requires_grad=True)
    y = torch.full((2, 4), -20000.0, dtype=torch.float16, device=device)
    _total, per_task = ops.multitask_loss([x], [y], ["mse"])
    assert per_task[0].item() == 1.6e9
    (grad,) = torch.autograd.grad(per_task[0], [x])
    assert grad.dtype == torch.float16
    assert torch.equal(grad, torch.full_like(grad, 10000.0))


@pytest.mark.parametrize("into", ["total", "per_task"])
def test_double_backward_raises(device, into):
    g = torch.Generator().manual_seed(1)
    x_ce = torch.randn(5, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    x_mse = torch.randn(3, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.rand(2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    r = torch.rand(2, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y_ce = torch.tensor([0, 3, -100, 1, 2], device=device)
    y_mse = torch.randn(3, 2, generator=g, dtype=torch.float64).to(device)
    total, per_task = ops.multitask_loss([x_ce * 2, x_mse], [y_ce, y_mse], ["ce", "mse"], w, r)
    out = total if into == "total" else (per_task * torch.arange(1.0, 3.0, device=device)).sum()
    assert_double_backward_raises(
        out, [x_ce, x_mse, w, r] if into == "total" else [x_ce, x_mse], "multitask_loss"
    )
    assert_nested_func_grad_raises(
        lambda x: ops.multitask_loss([x], [y_ce], ["ce"])[0], x_ce.detach(), "multitask_loss"
    )


def test_forward_mode_ad_raises(device):
    """No forward-mode formula: any argument with a tangent raises, naming it."""
    import torch.autograd.forward_ad as fwad

    args = {
        "logits": [torch.randn(4, 3, device=device), torch.randn(4, 2, device=device)],
        "targets": [torch.tensor([0, 1, 2, 0], device=device), torch.randn(4, 2, device=device)],
        "weights": torch.rand(2, device=device),
        "relation": torch.rand(2, 2, device=device),
    }
    with fwad.dual_level():
        for name, index in [("logits", 1), ("targets", 1), ("weights", None), ("relation", None)]:
            call = {k: list(v) if isinstance(v, list) else v for k, v in args.items()}
            if index is None:
                call[name] = fwad.make_dual(call[name], torch.ones_like(call[name]))
                label = name
            else:
                call[name][index] = fwad.make_dual(
                    call[name][index], torch.ones_like(call[name][index])
                )
                label = re.escape(f"{name}[{index}]")
            with pytest.raises(NotImplementedError, match=f"{label} is a dual tensor"):
                ops.multitask_loss(
                    call["logits"],
                    call["targets"],
                    ["ce", "mse"],
                    call["weights"],
                    call["relation"],
                )


def test_gradcheck_float64(device):
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()

    x_ce, x_dense, x_bce, x_mse, x_l1 = t(5, 4), t(2, 3, 2, 2), t(4, 3), t(3, 2), t(3, 2)
    y_ce = torch.tensor([0, 3, -100, 1, 2], device=device)
    y_dense = torch.randint(3, (2, 2, 2), generator=g).to(device)
    y_bce = torch.rand(4, 3, generator=g, dtype=torch.float64).to(device)
    y_bce[1, 1] = float("nan")
    y_mse = torch.randn(3, 2, generator=g, dtype=torch.float64).to(device)
    y_l1 = (x_l1.detach() + 0.5 * torch.sign(torch.randn(3, 2, generator=g)).to(device)).double()
    w, r = t(5), t(5, 5)

    def f(a, b, c, d, e, w, r):
        return ops.multitask_loss(
            [a, b, c, d, e],
            [y_ce, y_dense, y_bce, y_mse, y_l1],
            ["ce", "ce", "bce", "mse", "l1"],
            w,
            r,
            label_smoothing=0.1,
        )

    assert torch.autograd.gradcheck(f, (x_ce, x_dense, x_bce, x_mse, x_l1, w, r))


def test_only_needed_gradients_are_computed(device):
    x = torch.randn(4, 3, device=device, requires_grad=True)
    y = torch.randint(3, (4,), device=device)
    w = torch.ones(2, device=device)
    r = torch.zeros(2, 2, device=device, requires_grad=True)
    total, _ = ops.multitask_loss([x, x.detach()], [y, y], ["ce", "ce"], w, r)
    (g_r,) = torch.autograd.grad(total, [r])
    per_task = reference.multitask_loss([x, x], [y, y], ["ce", "ce"])[1].detach()
    torch.testing.assert_close(g_r, torch.outer(per_task, per_task))
    with torch.no_grad():
        total, per_task = ops.multitask_loss([x], [y], ["ce"])
    assert total.grad_fn is None and per_task.grad_fn is None


def test_backward_twice_with_retain_graph(device):
    """A kept graph is scaled into new tensors; the last backward scales the saved gradients in
    place. Both give the same gradients."""
    p = random_problem(4, device)
    total, per_task = ours(p)
    out = total + per_task.sum()
    first = torch.autograd.grad(out, p.leaves, retain_graph=True)
    second = torch.autograd.grad(out, p.leaves, retain_graph=True)
    last = torch.autograd.grad(out, p.leaves)
    for a, b, c in zip(first, second, last, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(out, p.leaves)


# Gradient tolerances by logits dtype (against the float64 reference).
GRAD_RTOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_forward_gradients_over_grad_scale_are_the_task_gradients(device, dtype, seed):
    """multitask_loss_with_grad's contract, whatever a device pre-scales: grads[i] /
    grad_scale[i] = d per_task[i] / d logits[i], and grad_scale[i] = 0 (grads[i] = 0) for a
    task without a valid label."""
    p = random_problem(seed, device, dtype)
    detached = [x.detach() for x in p.logits]
    w = None if p.weights is None else p.weights.detach()
    r = None if p.relation is None else p.relation.detach()
    _, _, grad_scale, grads = torch.ops.mtlcore.multitask_loss_with_grad(
        detached, p.targets, p.kinds, w, r, p.ignore_index, p.label_smoothing
    )
    x64 = [x.double().requires_grad_() for x in detached]
    y64 = [y.double() if y.is_floating_point() else y for y in p.targets]
    _, per_task = reference.multitask_loss(x64, y64, p.kinds, **p.kwargs())
    for i, (g, x) in enumerate(zip(grads, x64, strict=True)):
        (expected,) = torch.autograd.grad(per_task[i], [x], retain_graph=True)
        if float(grad_scale[i]) == 0.0:
            assert torch.equal(expected, torch.zeros_like(expected)), i
            assert torch.equal(g, torch.zeros_like(g)), i
            continue
        assert_close(g.double() / grad_scale[i].double(), expected, GRAD_RTOL[dtype], f"task {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_forward_writes_final_gradients_and_backward_leaves_them(dtype):
    """On the CPU the forward writes task i's gradient times w_i / n_i (n_i its positions): with
    every label present, the gradient 1 into total and no relation, that is d total / d logits,
    grad_scale[i] is w_i, and the in-place backward returns the saved gradients untouched (no
    pass over them). They are still the right gradients."""
    g = torch.Generator().manual_seed(5)
    shapes = [(64, 10), (4, 5, 8, 8), (64, 7), (3, 300)]
    kinds = ["ce", "ce", "bce", "mse"]
    base = [torch.randn(s, generator=g) for s in shapes]
    targets = [
        torch.randint(10, (64,), generator=g),
        torch.randint(5, (4, 8, 8), generator=g),
        torch.rand(64, 7, generator=g),
        torch.randn(3, 300, generator=g),
    ]
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.tensor([0.3, 1.7, 0.05, 1.0], dtype=loss_dtype)
    targets = [y.to(dtype) if y.is_floating_point() else y for y in targets]
    logits = [x.to(dtype).requires_grad_() for x in base]
    _, _, grad_scale, forward_grads = torch.ops.mtlcore.multitask_loss_with_grad(
        [x.detach() for x in logits], targets, kinds, weights, None, -100, 0.0
    )
    assert torch.equal(grad_scale, weights)
    total, _ = ops.multitask_loss(logits, targets, kinds, weights)
    got = torch.autograd.grad(total, logits)
    x64 = [x.detach().double().requires_grad_() for x in logits]
    y64 = [y.double() if y.is_floating_point() else y for y in targets]
    ref_total, _ = reference.multitask_loss(x64, y64, kinds, weights.double())
    expected = torch.autograd.grad(ref_total, x64)
    for i, (a, f, e) in enumerate(zip(got, forward_grads, expected, strict=True)):
        assert torch.equal(a, f), f"task {i}: backward changed a final gradient"
        assert_close(a.double(), e, GRAD_RTOL[dtype], f"task {i}")


def test_cpu_gradients_with_weights_the_forward_does_not_prescale_by():
    """Weights whose w_i / n_i the forward does not write the gradient times (zero, tiny, huge,
    negative), with gradients flowing into total and per_task, missing labels and half logits
    (whose gradients are never pre-scaled): the gradients match the float64 reference."""
    g = torch.Generator().manual_seed(9)
    kinds = ["ce", "bce", "mse", "l1", "ce"]
    shapes = [(1, 4), (2, 3), (64, 5), (1, 1), (300, 3)]
    targets = [
        torch.tensor([2]),
        torch.rand(2, 3, generator=g),
        torch.randn(64, 5, generator=g),
        torch.tensor([[float("nan")]]),
        torch.randint(3, (300,), generator=g),
    ]
    targets[4][:7] = -100
    weights = torch.tensor([0.0, 1e-12, 5e3, -0.5, 2.0])
    mix = torch.randn(5, generator=g)
    for dtype in (torch.float32, torch.float16):
        logits = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]
        ys = [y.to(dtype) if y.is_floating_point() else y for y in targets]
        total, per_task = ops.multitask_loss(logits, ys, kinds, weights)
        got = torch.autograd.grad(total + (mix * per_task).sum(), logits)
        x64 = [x.detach().double().requires_grad_() for x in logits]
        y64 = [y.double() if y.is_floating_point() else y for y in ys]
        ref_total, ref_pt = reference.multitask_loss(x64, y64, kinds, weights.double())
        expected = torch.autograd.grad(ref_total + (mix.double() * ref_pt).sum(), x64)
        for i, (a, e) in enumerate(zip(got, expected, strict=True)):
            assert_close(a.double(), e, GRAD_RTOL[dtype], f"{dtype} task {i}")


def test_memory_kept_for_backward_is_the_logits_size(device):
    """What the graph node saves: one gradient per task, the logits' size and dtype, plus
    T-sized tensors (per-task losses, scales, weights, relation)."""
    x = torch.randn(64, 100, device=device, requires_grad=True)
    d = torch.randn(4, 5, 8, 8, device=device, requires_grad=True)
    y = torch.randint(100, (64,), device=device)
    yd = torch.randint(5, (4, 8, 8), device=device)
    w = torch.ones(2, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = ops.multitask_loss([x, d], [y, yd], ["ce", "ce"], w)
    logits_bytes = x.numel() * 4 + d.numel() * 4
    assert sum(saved) - logits_bytes <= 64, saved
    total.backward()
    assert x.grad is not None and d.grad is not None


def test_cpu_results_do_not_depend_on_threads():
    p = random_problem(11, "cpu")
    dense = torch.randn(3, 7, 40, 40, requires_grad=True)  # enough work for many items
    p = Problem(
        [*p.logits, dense],
        [*p.targets, torch.randint(7, (3, 40, 40))],
        [*p.kinds, "ce"],
        None,
        None,
        p.ignore_index,
        p.label_smoothing,
        [*p.leaves[: len(p.kinds)], dense],
    )
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            total, per_task, grads = run(p, ours)
            results.append([total, per_task, *grads])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_every_isa_path_matches_the_reference():
    """The base, AVX2 and AVX-512 loops (those this CPU runs) each match the reference."""
    script = (
        "import sys, torch, mtlcore\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_multitask_loss as t\n"
        "problems = [t.random_problem(seed, 'cpu') for seed in range(6)]\n"
        "problems += [t.every_loop_problem('cpu', smoothing=s) for s in (0.0, 0.1)]\n"
        "for p in problems:\n"
        "    a, b = t.run(p, t.ours), t.run(p, t.ref64)\n"
        "    t.assert_close(a[1], b[1], 1e-5, 'per_task')\n"
        "    for x, e in zip(a[2], b[2]):\n"
        "        t.assert_close(x, e, 1e-4, 'grad')\n"
        "print(mtlcore.build_info()['cpu_isa'])\n"
    )
    used = set()
    for isa in ("base", "avx2", "avx512"):
        env = {**os.environ, "MTLCORE_CPU_ISA": isa}
        out = subprocess.run(
            [sys.executable, "-c", script, os.path.dirname(__file__)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        used.add(out.stdout.strip().splitlines()[-1])
    assert "base" in used


# ------------------------------------------------------------------------------------------
# opcheck, torch.compile, autocast
# ------------------------------------------------------------------------------------------


def test_opcheck(device):
    p = random_problem(5, device)
    while p.weights is None or p.relation is None:
        p = random_problem(p.ignore_index + 100 + len(p.kinds), device)
    args = (p.logits, p.targets, p.kinds, p.weights, p.relation, p.ignore_index, p.label_smoothing)
    torch.library.opcheck(torch.ops.mtlcore.multitask_loss.default, args)
    detached = ([x.detach() for x in p.logits], *args[1:3], p.weights.detach(), p.relation.detach())
    torch.library.opcheck(
        torch.ops.mtlcore.multitask_loss_with_grad.default, (*detached, *args[5:])
    )
    _, per_task, scale, grads = torch.ops.mtlcore.multitask_loss_with_grad(*detached, *args[5:])
    g_total = torch.ones((), device=device)
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        torch.library.opcheck(
            torch.ops.mtlcore.multitask_loss_backward.default,
            (g_total, per_task.clone(), per_task, scale, grads, p.weights.detach(), None, mask),
        )
    expected = torch.ops.mtlcore.multitask_loss_backward(
        g_total, None, per_task, scale, grads, None, p.relation.detach(), [True, False, False]
    )[0]
    in_place = [g.clone() for g in grads]
    torch.library.opcheck(
        torch.ops.mtlcore.multitask_loss_backward_.default,
        (g_total, None, per_task, scale, [g.clone() for g in grads], None, p.relation.detach()),
    )
    torch.ops.mtlcore.multitask_loss_backward_(
        g_total, None, per_task, scale, in_place, None, p.relation.detach()
    )
    for a, e in zip(in_place, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    p = random_problem(7, device)

    def f(logits, targets, weights, relation):
        total, per_task = ops.multitask_loss(
            logits, targets, p.kinds, weights, relation, **p.kwargs()
        )
        return total + per_task.sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    expected = torch.autograd.grad(f(p.logits, p.targets, p.weights, p.relation), p.leaves)
    actual = torch.autograd.grad(compiled(p.logits, p.targets, p.weights, p.relation), p.leaves)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)


def test_compile_dynamic_shapes_without_recompiling(device):
    """Compiled with dynamic shapes (batch and dense sizes vary, as with a last partial batch),
    the fake kernel keeps every size symbolic: one trace, and the values and the gradients for
    the logits, weights and relation match eager at each size."""

    def f(logits, targets, weights, relation):
        total, per_task = ops.multitask_loss(
            logits, targets, ["ce", "ce", "bce", "l1"], weights, relation, label_smoothing=0.1
        )
        return total + per_task.square().sum()

    g = torch.Generator().manual_seed(14)
    weights = torch.rand(4, generator=g).to(device).requires_grad_()
    relation = torch.randn(4, 4, generator=g).to(device).requires_grad_()
    compiled = CompiledOnce(f)
    # Sizes that match no other dimension (duck sizing would tie equal sizes together).
    for b, h, w in [(6, 17, 23), (7, 19, 22), (9, 26, 18)]:
        logits = [
            torch.randn(b, 11, generator=g),
            torch.randn(b, 3, h, w, generator=g),
            torch.randn(b, 2, generator=g),
            torch.randn(b, 5, h, generator=g),
        ]
        targets = [
            torch.randint(11, (b,), generator=g),
            torch.randint(3, (b, h, w), generator=g),
            torch.rand(b, 2, generator=g),
            torch.randn(b, 5, h, generator=g),
        ]
        targets[1][0, 0] = -100
        targets[3][1, 2] = float("nan")
        logits = [x.to(device).requires_grad_() for x in logits]
        targets = [y.to(device) for y in targets]
        leaves = [*logits, weights, relation]
        got = compiled(logits, targets, weights, relation)
        want = f(logits, targets, weights, relation)
        torch.testing.assert_close(got, want)
        for a, e in zip(
            torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True
        ):
            torch.testing.assert_close(a, e)


def test_autocast(device):
    """Heads under autocast give fp16/bf16 logits; the loss reads them as they are."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    g = torch.Generator().manual_seed(0)
    features = torch.randn(32, 16, generator=g).to(device)
    heads = torch.nn.ModuleList([torch.nn.Linear(16, 10), torch.nn.Linear(16, 3)]).to(device)
    y = [
        torch.randint(10, (32,), generator=g).to(device),
        torch.randn(32, 3, generator=g).to(device),
    ]
    with torch.autocast(device, dtype=dtype):
        logits = [h(features) for h in heads]
        assert all(x.dtype == dtype for x in logits)
        total, _per_task = ops.multitask_loss(logits, y, ["ce", "mse"])
    assert total.dtype == torch.float32
    total.backward()
    grads = [p.grad.clone() for p in heads.parameters()]
    heads.zero_grad()
    ref_total, _ = reference.multitask_loss([h(features) for h in heads], y, ["ce", "mse"])
    ref_total.backward()
    torch.testing.assert_close(total, ref_total, rtol=2e-2, atol=2e-2)
    for a, e in zip(grads, [p.grad for p in heads.parameters()], strict=True):
        torch.testing.assert_close(a, e, rtol=5e-2, atol=5e-2 * float(e.abs().max()))


# ------------------------------------------------------------------------------------------
# MultiTaskLoss
# ------------------------------------------------------------------------------------------


def test_module_fixed_weights_and_relation(device):
    p = random_problem(2, device)
    names = [f"t{i}" for i in range(len(p.kinds))]
    w = torch.rand(len(names)).tolist()
    rel = torch.randn(len(names), len(names))
    loss = MultiTaskLoss(
        dict(zip(names, p.kinds, strict=True)), weights=w, relation=rel, **p.kwargs()
    )
    loss.to(device)
    total, parts = loss(
        dict(zip(names, p.logits, strict=True)), dict(zip(names, p.targets, strict=True))
    )
    ref_total, ref_pt = reference.multitask_loss(
        p.logits, p.targets, p.kinds, torch.tensor(w, device=device), rel.to(device), **p.kwargs()
    )
    assert list(parts) == names
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(list(parts.values())), ref_pt, rtol=1e-5, atol=1e-6)
    assert not list(loss.parameters())


def test_module_uncertainty_weighting_trains(device):
    """Learnable log-variances s_i: total = sum exp(-s_i) L_i + s_i; d total / d s_i =
    1 - exp(-s_i) L_i, so s_i moves towards log L_i."""
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 5, generator=g).to(device), torch.randn(16, 2, generator=g).to(device)]
    y = [
        torch.randint(5, (16,), generator=g).to(device),
        10 * torch.randn(16, 2, generator=g).to(device),
    ]
    loss = MultiTaskLoss({"a": "ce", "b": "mse"}, learnable="uncertainty").to(device)
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        total, parts = loss({"a": x[0], "b": x[1]}, {"a": y[0], "b": y[1]})
        total.backward()
        opt.step()
    per_task = torch.stack([parts["a"], parts["b"]]).detach()
    torch.testing.assert_close(loss.log_vars.detach(), per_task.log(), rtol=0, atol=1e-2)
    expected = (torch.exp(-loss.log_vars) * per_task + loss.log_vars).sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_module_learnable_relation_gets_gradients(device):
    loss = MultiTaskLoss({"a": "mse", "b": "l1"}, learnable="relation").to(device)
    x = {k: torch.randn(4, 2, device=device) for k in "ab"}
    y = {k: torch.randn(4, 2, device=device) for k in "ab"}
    total, parts = loss(x, y)
    total.backward()
    per_task = torch.stack([parts["a"], parts["b"]]).detach()
    torch.testing.assert_close(loss.relation.grad, torch.outer(per_task, per_task))


def test_module_checks_its_inputs():
    loss = MultiTaskLoss({"a": "ce", "b": "mse"})
    with pytest.raises(ValueError, match="missing outputs for tasks: b"):
        loss({"a": torch.randn(2, 3)}, {"a": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="unknown kind"):
        MultiTaskLoss({"a": "hinge"})
    with pytest.raises(ValueError, match="weights must have 2"):
        MultiTaskLoss({"a": "ce", "b": "mse"}, weights=[1.0])
    with pytest.raises(ValueError, match="learnable"):
        MultiTaskLoss({"a": "ce"}, learnable="everything")


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def good():
    return {
        "logits": [torch.randn(4, 3), torch.randn(4, 2)],
        "targets": [torch.tensor([0, 1, 2, 1]), torch.randn(4, 2)],
        "kinds": ["ce", "mse"],
    }


BAD_INPUT = [
    ({"kinds": ["ce"]}, ValueError, "one entry per task"),
    ({"kinds": ["ce", "huber"]}, ValueError, r"kinds\[1\] is 'huber'"),
    (
        {"targets": [torch.zeros(4), torch.randn(4, 2)]},
        TypeError,
        r"targets\[0\] \(ce\) must hold int64",
    ),
    (
        {"targets": [torch.zeros(5, dtype=torch.long), torch.randn(4, 2)]},
        ValueError,
        r"targets\[0\] \(ce\) must have shape",
    ),
    (
        {"targets": [torch.tensor([0, 1, 2, 1]), torch.randn(4, 3)]},
        ValueError,
        r"targets\[1\] \(mse\) must have the logits' shape",
    ),
    (
        {"targets": [torch.tensor([0, 1, 2, 1]), torch.ones(4, 2, dtype=torch.long)]},
        TypeError,
        r"targets\[1\] \(mse\) must be a floating-point",
    ),
    (
        {"targets": [torch.tensor([0, 3, 2, 1]), torch.randn(4, 2)]},
        ValueError,
        r"targets\[0\] holds the label 3",
    ),
    (
        {"targets": [torch.tensor([0, -1, 2, 1]), torch.randn(4, 2)]},
        ValueError,
        r"targets\[0\] holds the label -1",
    ),
    (
        {"logits": [torch.randn(4), torch.randn(4, 2)]},
        ValueError,
        r"logits\[0\] \(ce\) must be \[B, C\]",
    ),
    (
        {"logits": [torch.randn(4, 0), torch.randn(4, 2)]},
        ValueError,
        r"logits\[0\] \(ce\) must have at least one class",
    ),
    ({"weights": torch.ones(3)}, ValueError, r"weights must have shape \[2\]"),
    ({"relation": torch.ones(2, 3)}, ValueError, r"relation must have shape \[2, 2\]"),
    (
        {"relation": torch.ones(2, 2, dtype=torch.long)},
        TypeError,
        "relation must be a floating-point",
    ),
    ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    ({"label_smoothing": float("nan")}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    ({"logits": [], "targets": [], "kinds": []}, ValueError, "at least one task"),
    (
        {"logits": [torch.randn(4, 3).long(), torch.randn(4, 2)]},
        TypeError,
        r"logits\[0\] has dtype Long",
    ),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_INPUT)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        ops.multitask_loss(**{**good(), **overrides})


def test_bad_input_through_the_raw_ops():
    a = good()
    with pytest.raises(TypeError, match=r"logits\[1\] has dtype Double but logits\[0\] has Float"):
        torch.ops.mtlcore.multitask_loss(
            [a["logits"][0], a["logits"][1].double()],
            a["targets"],
            a["kinds"],
            None,
            None,
            -100,
            0.0,
        )
    total, per_task, scale, grads = torch.ops.mtlcore.multitask_loss_with_grad(
        a["logits"], a["targets"], a["kinds"], None, None, -100, 0.0
    )
    with pytest.raises(ValueError, match="grads has 1 tensors but per_task has 2"):
        torch.ops.mtlcore.multitask_loss_backward(
            total, None, per_task, scale, grads[:1], None, None, [True, False, False]
        )
    with pytest.raises(ValueError, match=r"grad_per_task must have shape \[2\]"):
        torch.ops.mtlcore.multitask_loss_backward(
            None, per_task[:1], per_task, scale, grads, None, None, [True, False, False]
        )


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_device_mismatch():
    a = good()
    with pytest.raises(ValueError, match=r"targets\[0\] is on"):
        ops.multitask_loss([x.cuda() for x in a["logits"]], a["targets"], a["kinds"])
    with pytest.raises(ValueError, match="weights is on"):
        ops.multitask_loss(
            [x.cuda() for x in a["logits"]],
            [y.cuda() for y in a["targets"]],
            a["kinds"],
            torch.ones(2),
        )


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_cuda_label_out_of_range_is_a_device_side_error():
    """On CUDA the label check runs in the kernel: a device-side assert, reported as an error at
    the next synchronisation, never an out-of-bounds access."""
    assert_device_side_assertion(
        "import torch, mtlcore\n"
        "from mtlcore import ops\n"
        "x = torch.randn(4, 3, device='cuda')\n"
        "y = torch.tensor([0, 7, 1, 2], device='cuda')\n"
        "total, _ = ops.multitask_loss([x], [y], ['ce'])\n"
        "torch.cuda.synchronize()\n"
    )


def test_module_relation_decay_keeps_a_learnable_relation_bounded():
    loss = MultiTaskLoss({"a": "mse", "b": "mse"}, learnable="relation", relation_decay=0.5)
    x = {k: torch.randn(8, 2) for k in "ab"}
    y = {k: torch.randn(8, 2) for k in "ab"}
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        loss(x, y)[0].backward()
        opt.step()
    per_task = torch.stack([F.mse_loss(x[k], y[k]) for k in "ab"])
    # The minimum of sum R_ij L_i L_j + 0.5 |R|^2 is R = -L L^T.
    torch.testing.assert_close(
        loss.relation.detach(), -torch.outer(per_task, per_task), rtol=1e-3, atol=1e-3
    )
    with pytest.raises(ValueError, match="relation_decay must be >= 0"):
        MultiTaskLoss({"a": "mse"}, relation_decay=-1.0)
