"""Property tests of the loss-weighting strategies."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtlcore import weighting as wt

LOSS_BASED = ["equal", "uncertainty", "dwa", "rlw", "famo"]
GRADIENT_BASED = ["gradnorm", "pcgrad", "mgda", "cagrad"]


def make(name, t):
    return wt.get(name, t, weights=[1.0] * t) if name == "fixed" else wt.get(name, t)


@pytest.mark.parametrize("name", [*LOSS_BASED, "fixed"])
def test_loss_based_weights_are_finite_and_non_negative(name):
    g = torch.Generator().manual_seed(0)
    w = make(name, 4)
    for _epoch in range(4):
        for _ in range(5):
            losses = torch.rand(4, generator=g) * 3 + 0.01
            weights = w.weights(losses)
            assert weights.shape == (4,) and torch.isfinite(weights).all()
            assert (weights >= 0).all()
            total = w.total(losses.clone().requires_grad_())
            assert torch.isfinite(total)
            w.after_step(losses * 0.9)
        w.end_epoch(torch.rand(4, generator=g) + 0.1)


@pytest.mark.parametrize("name", GRADIENT_BASED)
def test_gradient_based_weights_are_finite_and_non_negative(name):
    g = torch.Generator().manual_seed(1)
    w = make(name, 3)
    for _ in range(10):
        grads = torch.randn(3, 50, generator=g)
        combined, weights = w.combine(grads, torch.rand(3, generator=g) + 0.1)
        assert combined.shape == (50,) and torch.isfinite(combined).all()
        assert torch.isfinite(weights).all() and (weights >= 0).all()


def test_equal_weighting_is_the_summed_loss():
    losses = torch.tensor([0.3, 1.2, 2.0], requires_grad=True)
    assert torch.equal(wt.get("equal", 3).total(losses), losses.sum())


def test_uncertainty_total_and_parameters():
    w = wt.get("uncertainty", 2)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0])
    expected = (torch.exp(-w.log_vars) * losses + w.log_vars).sum()
    torch.testing.assert_close(w.total(losses), expected)
    assert len(list(w.parameters())) == 1


def test_dwa_follows_the_loss_ratios():
    w = wt.get("dwa", 2, temperature=1.0)
    assert torch.equal(w.weights(torch.ones(2)), torch.ones(2))
    w.end_epoch(torch.tensor([1.0, 1.0]))
    w.end_epoch(torch.tensor([0.5, 1.0]))  # task 0 falls, task 1 stalls: task 1 weighs more
    weights = w.weights(torch.ones(2))
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]), 0)
    torch.testing.assert_close(weights, expected)
    assert weights[1] > weights[0] and float(weights.sum()) == pytest.approx(2.0)


def test_famo_raises_the_weight_of_the_task_that_falls_slowest():
    w = wt.get("famo", 2, lr=0.5)
    for _ in range(20):
        w.total(torch.tensor([1.0, 1.0]))
        w.after_step(torch.tensor([0.5, 0.99]))  # task 0 improves a lot, task 1 barely
    z = torch.softmax(w.xi, 0)
    assert z[1] > z[0]


@pytest.mark.parametrize("seed", range(20))
def test_pcgrad_combined_gradient_conflicts_with_no_task(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(2, 30, generator=g)
    if grads[0] @ grads[1] > 0:  # make them conflict
        grads[1] = -grads[1] + 0.1 * torch.randn(30, generator=g)
    combined, _ = wt.get("pcgrad", 2, seed=seed).combine(grads, torch.ones(2))
    for i in range(2):
        assert combined @ grads[i] >= -1e-5


def test_pcgrad_leaves_agreeing_gradients_alone():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    combined, _ = wt.get("pcgrad", 2).combine(grads, torch.ones(2))
    torch.testing.assert_close(combined, grads.sum(0))


def brute_force_min_norm(grads, steps=200):
    """Min over a fine grid of the 3-simplex of |w^T G|."""
    best, best_w = float("inf"), None
    for i, j in itertools.product(range(steps + 1), repeat=2):
        if i + j > steps:
            continue
        w = torch.tensor([i, j, steps - i - j], dtype=torch.float64) / steps
        n = float((w @ grads.double()).norm())
        if n < best:
            best, best_w = n, w
    return best, best_w


@pytest.mark.parametrize("seed", range(5))
def test_mgda_finds_the_min_norm_point(seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 4, generator=g, dtype=torch.float64)
    w = wt.min_norm_point(grads)
    assert float(w.sum()) == pytest.approx(1.0) and (w >= -1e-12).all()
    ours = float((w @ grads).norm())
    best, _ = brute_force_min_norm(grads)
    assert ours <= best + 1e-6
    combined, _ = wt.get("mgda", 3).combine(grads, torch.ones(3))
    assert float(combined.norm()) == pytest.approx(ours, abs=1e-9)


def test_mgda_two_tasks_is_exact():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    w = wt.min_norm_point(grads)
    # min over s of |(s, 2(1 - s))|: s = 4/5
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("name", ["equal", "dwa", "mgda", "cagrad", "gradnorm"])
def test_invariant_to_task_order(name):
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(3, 20, generator=g, dtype=torch.float64)
    losses = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    perm = torch.tensor([2, 0, 1])
    a, b = make(name, 3), make(name, 3)
    if name == "dwa":
        for e in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.9, 1.0])):
            a.end_epoch(e)
            b.end_epoch(e[perm])
        torch.testing.assert_close(b.weights(losses[perm]), a.weights(losses)[perm])
        return
    if name == "equal":
        torch.testing.assert_close(b.weights(losses[perm]), a.weights(losses)[perm])
        return
    combined_a, w_a = a.combine(grads, losses)
    combined_b, w_b = b.combine(grads[perm], losses[perm])
    torch.testing.assert_close(w_b, w_a[perm], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(combined_b, combined_a, rtol=1e-4, atol=1e-5)


def test_cagrad_improves_the_worst_task_over_the_mean():
    """CAGrad maximises the smallest task improvement near g0: its worst inner product with a
    task gradient is at least the mean gradient's."""
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(3, 10, generator=g, dtype=torch.float64)
    grads[2] = -0.8 * grads[0] + 0.1 * grads[2]  # a conflict
    combined, _ = wt.get("cagrad", 3, c=0.5).combine(grads, torch.ones(3))
    g0 = grads.mean(0)
    assert float((grads @ combined).min()) >= float((grads @ g0).min()) - 1e-9
    assert float((combined - g0).norm()) <= 0.5 * float(g0.norm()) + 1e-6


def test_get_checks_the_name():
    with pytest.raises(ValueError, match="unknown weighting 'magic'"):
        wt.get("magic", 2)
    with pytest.raises(ValueError, match="fixed weights must be 2"):
        wt.get("fixed", 2, weights=[1.0])
