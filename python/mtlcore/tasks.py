"""Tasks and their metrics.

A :class:`Task` names one head of a multi-task model: its loss kind (the kinds of
:func:`mtlcore.ops.multitask_loss`), its number of outputs, its weight in the total loss and the
metrics it is evaluated with. Metrics accumulate over batches, skip missing labels (the
``ignore_index`` class for ce, NaN targets otherwise) exactly as the loss does, and say whether
higher is better, which the multi-task gain needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mtlcore import ops

__all__ = ["METRICS", "Metric", "Task", "default_metrics", "multitask_gain"]


class Metric:
    """A streaming metric: ``update(output, target)`` per batch, then ``compute()``."""

    name: str = ""
    higher_is_better: bool = True

    def __init__(self, num_outputs: int, ignore_index: int = -100) -> None:
        self.num_outputs = int(num_outputs)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError


class _ClassCounts(Metric):
    """ce metrics from a confusion matrix over the valid positions (dim 1 holds the classes)."""

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_outputs, self.num_outputs, dtype=torch.float64)

    def update(self, output: Tensor, target: Tensor) -> None:
        pred = output.detach().argmax(dim=1).reshape(-1).cpu()
        true = target.detach().reshape(-1).cpu()
        valid = true != self.ignore_index
        k = self.num_outputs
        index = true[valid] * k + pred[valid]
        self.confusion += torch.bincount(index, minlength=k * k).reshape(k, k).double()


class Accuracy(_ClassCounts):
    name = "accuracy"

    def compute(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diag().sum() / total) if total > 0 else math.nan


class MacroF1(_ClassCounts):
    """Mean over the classes present (in targets or predictions) of 2 TP / (2 TP + FP + FN)."""

    name = "macro_f1"

    def compute(self) -> float:
        tp = self.confusion.diag()
        fp = self.confusion.sum(0) - tp
        fn = self.confusion.sum(1) - tp
        denom = 2 * tp + fp + fn
        present = denom > 0
        return float((2 * tp[present] / denom[present]).mean()) if present.any() else math.nan


class MeanIoU(_ClassCounts):
    """Mean over the classes present of TP / (TP + FP + FN): the segmentation metric."""

    name = "mean_iou"

    def compute(self) -> float:
        tp = self.confusion.diag()
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        present = union > 0
        return float((tp[present] / union[present]).mean()) if present.any() else math.nan


class BinaryAccuracy(Metric):
    """bce: the share of valid outputs whose sign (logit > 0) matches target > 0.5."""

    name = "binary_accuracy"

    def reset(self) -> None:
        self.correct = 0.0
        self.count = 0.0

    def update(self, output: Tensor, target: Tensor) -> None:
        valid = ~torch.isnan(target)
        hit = (output.detach() > 0) == (target > 0.5)
        self.correct += float(hit[valid].sum())
        self.count += float(valid.sum())

    def compute(self) -> float:
        return self.correct / self.count if self.count else math.nan


class _Errors(Metric):
    higher_is_better = False

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def update(self, output: Tensor, target: Tensor) -> None:
        valid = ~torch.isnan(target)
        diff = (output.detach().double() - target.double())[valid]
        self.total += float(self._accumulate(diff))
        self.count += float(valid.sum())


class RMSE(_Errors):
    name = "rmse"

    def _accumulate(self, diff: Tensor) -> Tensor:
        return diff.square().sum()

    def compute(self) -> float:
        return math.sqrt(self.total / self.count) if self.count else math.nan


class MAE(_Errors):
    name = "mae"

    def _accumulate(self, diff: Tensor) -> Tensor:
        return diff.abs().sum()

    def compute(self) -> float:
        return self.total / self.count if self.count else math.nan


#: Metrics by name.
METRICS: dict[str, type[Metric]] = {
    "accuracy": Accuracy,
    "macro_f1": MacroF1,
    "mean_iou": MeanIoU,
    "binary_accuracy": BinaryAccuracy,
    "rmse": RMSE,
    "mae": MAE,
}


def default_metrics(kind: str, dense: bool = False) -> tuple[str, ...]:
    """The metrics a task of this kind reports unless told otherwise."""
    if kind == "ce":
        return ("mean_iou", "accuracy") if dense else ("accuracy", "macro_f1")
    if kind == "bce":
        return ("binary_accuracy",)
    return ("rmse", "mae")


@dataclass
class Task:
    """One task of a multi-task model.

    Args:
        name: key of the task in model outputs, targets and results.
        kind: ``ce``, ``bce``, ``mse`` or ``l1`` (the loss, see :func:`mtlcore.ops.multitask_loss`).
        num_outputs: classes for ce, outputs per sample (or per pixel) otherwise.
        weight: the task's weight in the total loss.
        metrics: metric names (keys of :data:`METRICS`); default by kind (dense: per-pixel ce).
        dense: per-pixel outputs ``[B, C, H, W]`` rather than ``[B, C]``.
    """

    name: str
    kind: str
    num_outputs: int
    weight: float = 1.0
    metrics: Sequence[str] | None = None
    dense: bool = False
    _metric_names: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ops.LOSS_KINDS:
            raise ValueError(
                f"Task {self.name!r}: unknown kind {self.kind!r}; expected one of "
                f"{', '.join(ops.LOSS_KINDS)}"
            )
        if int(self.num_outputs) < 1:
            raise ValueError(
                f"Task {self.name!r}: num_outputs must be >= 1, got {self.num_outputs}"
            )
        names = (
            tuple(self.metrics)
            if self.metrics is not None
            else default_metrics(self.kind, self.dense)
        )
        for m in names:
            if m not in METRICS:
                known = ", ".join(METRICS)
                raise ValueError(
                    f"Task {self.name!r}: unknown metric {m!r}; expected one of {known}"
                )
        self._metric_names = names

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self._metric_names

    def new_metrics(self, ignore_index: int = -100) -> dict[str, Metric]:
        """Fresh accumulators for this task's metrics."""
        return {m: METRICS[m](self.num_outputs, ignore_index) for m in self._metric_names}

    def higher_is_better(self, metric: str) -> bool:
        return METRICS[metric].higher_is_better


def multitask_gain(
    tasks: Sequence[Task],
    results: dict[str, dict[str, float]],
    baselines: dict[str, dict[str, float]],
) -> float:
    """The multi-task gain in percent (Maninis et al. 2019):
    ``Δm = 100 / K * sum_k (-1)^{l_k} (M_k - B_k) / B_k`` over every metric k of every task,
    with ``l_k = 1`` when lower is better; ``baselines`` holds single-task results."""
    terms = []
    for task in tasks:
        for metric in task.metric_names:
            base = baselines[task.name][metric]
            value = results[task.name][metric]
            sign = 1.0 if task.higher_is_better(metric) else -1.0
            terms.append(sign * (value - base) / base)
    return 100.0 * sum(terms) / len(terms)
