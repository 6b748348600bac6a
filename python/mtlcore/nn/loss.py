"""MultiTaskLoss: every task's loss, their weights and their coupling, in one fused op."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlcore import ops

__all__ = ["MultiTaskLoss"]

_LEARNABLE = ("uncertainty", "relation")


def _task_kinds(tasks) -> dict[str, str]:
    """{name: kind} from a mapping or from objects with ``name`` and ``kind`` attributes."""
    if isinstance(tasks, Mapping):
        kinds = {str(k): str(v) for k, v in tasks.items()}
    else:
        kinds = {str(t.name): str(t.kind) for t in tasks}
    if not kinds:
        raise ValueError("MultiTaskLoss: needs at least one task")
    for name, kind in kinds.items():
        if kind not in ops.LOSS_KINDS:
            raise ValueError(
                f"MultiTaskLoss: task {name!r} has unknown kind {kind!r}; "
                f"expected one of {', '.join(ops.LOSS_KINDS)}"
            )
    return kinds


class MultiTaskLoss(nn.Module):
    """The multi-task objective on :func:`mtlcore.ops.multitask_loss`::

        total = sum_i w_i L_i + sum_ij R_ij L_i L_j         (+ sum_i s_i with uncertainty)

    Args:
        tasks: ``{name: kind}`` (kind: ``ce``, ``bce``, ``mse``, ``l1``), or objects with
            ``name`` and ``kind`` attributes such as :class:`mtlcore.Task`; the order is the
            order of ``per_task`` and of the rows of ``relation``.
        weights: fixed task weights ``w_i`` (a sequence or ``[T]`` tensor; default ones).
        relation: the ``[T, T]`` relation matrix ``R`` (default zero), fixed unless
            ``learnable`` says otherwise (then it is the initial value).
        learnable: ``None``, ``"uncertainty"``, ``"relation"`` or both (a sequence).
            ``"uncertainty"`` learns log-variances ``s_i`` (Kendall et al. 2018):
            ``w_i = weights[i] * exp(-s_i)`` and ``sum_i s_i`` is added to the total.
            ``"relation"`` makes ``R`` a parameter.
        ignore_index, label_smoothing: for ``ce`` tasks, as ``F.cross_entropy``.
        relation_decay: adds ``relation_decay * |R|^2`` to the total, which keeps a learnable
            relation bounded (without it, a negative ``R_ij`` would lower the total without
            limit as the losses grow).

    ``forward(outputs, targets)`` takes dicts keyed by task name (a NaN regression target or an
    ``ignore_index`` class marks a missing label) and returns ``(total, {name: loss})``.
    """

    def __init__(
        self,
        tasks: Mapping[str, str] | Iterable,
        weights: Sequence[float] | Tensor | None = None,
        relation: Tensor | Sequence[Sequence[float]] | None = None,
        learnable: str | Sequence[str] | None = None,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        relation_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.kinds = _task_kinds(tasks)
        self.names = list(self.kinds)
        t = len(self.names)
        modes = {learnable} if isinstance(learnable, str) else set(learnable or ())
        unknown = modes - set(_LEARNABLE)
        if unknown:
            raise ValueError(
                f"MultiTaskLoss: learnable must be None or among {_LEARNABLE}, got {learnable!r}"
            )
        w = torch.ones(t) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (t,):
            raise ValueError(
                f"MultiTaskLoss: weights must have {t} values, got shape {tuple(w.shape)}"
            )
        self.register_buffer("weights", w.clone())
        r = None if relation is None else torch.as_tensor(relation, dtype=torch.float32).clone()
        if r is not None and r.shape != (t, t):
            raise ValueError(f"MultiTaskLoss: relation must be [{t}, {t}], got {tuple(r.shape)}")
        if "relation" in modes:
            self.relation = nn.Parameter(torch.zeros(t, t) if r is None else r)
        else:
            self.register_buffer("relation", r)
        self.log_vars = nn.Parameter(torch.zeros(t)) if "uncertainty" in modes else None
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        if relation_decay < 0:
            raise ValueError(f"MultiTaskLoss: relation_decay must be >= 0, got {relation_decay}")
        self.relation_decay = float(relation_decay)

    def task_weights(self) -> Tensor:
        """The weights ``w_i`` the op receives (with uncertainty: ``weights * exp(-s)``)."""
        if self.log_vars is None:
            return self.weights
        return self.weights * torch.exp(-self.log_vars)

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        for what, given in (("outputs", outputs), ("targets", targets)):
            missing = [n for n in self.names if n not in given]
            if missing:
                raise ValueError(f"MultiTaskLoss: missing {what} for tasks: {', '.join(missing)}")
        total, per_task = ops.multitask_loss(
            [outputs[n] for n in self.names],
            [targets[n] for n in self.names],
            [self.kinds[n] for n in self.names],
            self.task_weights(),
            self.relation,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
        )
        if self.log_vars is not None:
            total = total + self.log_vars.sum()
        if self.relation_decay > 0 and self.relation is not None:
            total = total + self.relation_decay * self.relation.square().sum()
        return total, dict(zip(self.names, per_task.unbind(), strict=True))

    def extra_repr(self) -> str:
        learn = [
            m
            for m, on in (
                ("uncertainty", self.log_vars is not None),
                ("relation", isinstance(self.relation, nn.Parameter)),
            )
            if on
        ]
        return f"tasks={self.kinds}, learnable={learn or None}"
