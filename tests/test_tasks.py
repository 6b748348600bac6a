"""mtlcore.Task, its metrics (against direct computations) and the multi-task gain."""

from __future__ import annotations

import math

import pytest
import torch

from mtlcore import Task
from mtlcore.tasks import METRICS, multitask_gain


def test_task_defaults_and_checks():
    assert Task("a", "ce", 10).metric_names == ("accuracy", "macro_f1")
    assert Task("m", "ce", 4, dense=True).metric_names == ("mean_iou", "accuracy")
    assert Task("b", "bce", 3).metric_names == ("binary_accuracy",)
    assert Task("r", "mse", 2).metric_names == ("rmse", "mae")
    assert not Task("r", "l1", 1).higher_is_better("rmse")
    with pytest.raises(ValueError, match="unknown kind 'hinge'"):
        Task("a", "hinge", 2)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        Task("a", "ce", 2, metrics=["auc"])
    with pytest.raises(ValueError, match="num_outputs must be >= 1"):
        Task("a", "ce", 0)


def streamed(metric, outputs, targets):
    """Feeds the batches one by one, as an evaluation loop does."""
    for o, t in zip(outputs, targets, strict=True):
        metric.update(o, t)
    return metric.compute()


def test_classification_metrics_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 5, generator=g)
    labels = torch.randint(5, (300,), generator=g)
    labels[::7] = -100  # missing labels are skipped
    valid = labels != -100
    pred, true = logits.argmax(1)[valid], labels[valid]
    acc = (pred == true).double().mean().item()
    f1s, ious = [], []
    for c in range(5):
        tp = ((pred == c) & (true == c)).sum().item()
        fp = ((pred == c) & (true != c)).sum().item()
        fn = ((pred != c) & (true == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
            ious.append(tp / (tp + fp + fn))
    batches = (logits.split(64), labels.split(64))
    assert streamed(METRICS["accuracy"](5), *batches) == pytest.approx(acc)
    assert streamed(METRICS["macro_f1"](5), *batches) == pytest.approx(sum(f1s) / len(f1s))
    assert streamed(METRICS["mean_iou"](5), *batches) == pytest.approx(sum(ious) / len(ious))


def test_dense_and_regression_metrics():
    out = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    target = torch.tensor([[0.0, 2.0], [5.0, float("nan")]])
    target_missing = target.clone()
    target_missing[1, 1] = float("nan")
    assert streamed(METRICS["rmse"](2), [out[:, :1]], [target[:, :1]]) == pytest.approx(
        math.sqrt((1 + 4) / 2)
    )
    assert streamed(METRICS["mae"](2), [out], [target_missing]) == pytest.approx((1 + 0 + 2) / 3)
    seg = torch.zeros(1, 3, 2, 2)
    seg[0, 1] = 1.0  # predicts class 1 everywhere
    labels = torch.tensor([[[1, 1], [2, -100]]])
    assert streamed(METRICS["accuracy"](3), [seg], [labels]) == pytest.approx(2 / 3)
    # class 1: tp 2, fp 1 (the pixel of class 2) -> 2/3; class 2: tp 0, fn 1 -> 0
    assert streamed(METRICS["mean_iou"](3), [seg], [labels]) == pytest.approx((2 / 3 + 0) / 2)
    bce = METRICS["binary_accuracy"](2)
    assert streamed(bce, [torch.tensor([[2.0, -1.0]])], [torch.tensor([[1.0, 1.0]])]) == 0.5
    assert math.isnan(METRICS["rmse"](1).compute())


def test_multitask_gain():
    tasks = [Task("a", "ce", 3, metrics=["accuracy"]), Task("r", "mse", 1, metrics=["rmse"])]
    base = {"a": {"accuracy": 0.80}, "r": {"rmse": 2.0}}
    # +10% accuracy and rmse down 10% (an improvement): gain +10%
    assert multitask_gain(tasks, {"a": {"accuracy": 0.88}, "r": {"rmse": 1.8}}, base) == (
        pytest.approx(10.0)
    )
    assert multitask_gain(tasks, base, base) == 0.0
