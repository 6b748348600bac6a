"""Task relationships: measured affinity between tasks, relation matrices, task grouping.

- :func:`gradient_cosine`: cosine similarity of the tasks' gradients ``[T, T]``.
- :func:`lookahead_affinity`: inter-task affinity of Fifty et al. 2021 for one batch,
  ``Z[i, j] = 1 - L_j(theta after an SGD step on task i) / L_j(theta)``: positive when a step
  for task i also lowers task j's loss. :class:`AffinityMeter` averages it over steps.
- :func:`relation_from_affinity`: a relation matrix for :func:`mtlcore.ops.multitask_loss`.
- :func:`group_tasks`: the partition into ``num_groups`` groups with the largest total
  within-group affinity (exact up to :data:`EXACT_MAX_TASKS` tasks, a heuristic beyond).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "EXACT_MAX_TASKS",
    "AffinityMeter",
    "gradient_cosine",
    "group_score",
    "group_tasks",
    "lookahead_affinity",
    "relation_from_affinity",
]

EXACT_MAX_TASKS = 10


def gradient_cosine(grads: Tensor) -> Tensor:
    """``[T, T]`` cosine similarities of the rows of ``grads`` ``[T, D]`` (0 for a zero row)."""
    g = grads.double()
    norms = g.norm(dim=1).clamp(min=1e-30)
    return ((g @ g.T) / torch.outer(norms, norms)).to(grads.dtype)


@torch.no_grad()
def _apply(params: Sequence[nn.Parameter], deltas: Sequence[Tensor], sign: float) -> None:
    for p, d in zip(params, deltas, strict=True):
        p.add_(d, alpha=sign)


def lookahead_affinity(
    losses_fn: Callable[[], Tensor], shared: Sequence[nn.Parameter], lr: float
) -> Tensor:
    """``Z[i, j] = 1 - L_j(theta - lr grad_theta L_i) / L_j(theta)`` for one batch.

    ``losses_fn()`` evaluates the per-task losses ``[T]`` on a fixed batch (with autograd);
    ``shared`` are the parameters the lookahead step moves (the shared trunk's). The
    parameters are restored exactly afterwards. Costs T + 1 forward and T backward passes.
    """
    shared = [p for p in shared if p.requires_grad]
    losses = losses_fn()
    t = losses.shape[0]
    before = losses.detach().double()
    # Every task's step first: the graph of `losses` must not see the parameters move.
    steps = []
    for i in range(t):
        grads = torch.autograd.grad(losses[i], shared, retain_graph=i < t - 1, allow_unused=True)
        steps.append(
            [
                (g if g is not None else torch.zeros_like(p)) * lr
                for g, p in zip(grads, shared, strict=True)
            ]
        )
    del losses
    z = torch.zeros(t, t, dtype=torch.float64)
    for i, deltas in enumerate(steps):
        _apply(shared, deltas, -1.0)
        with torch.no_grad():
            after = losses_fn().detach().double()
        _apply(shared, deltas, 1.0)
        z[i] = 1 - after / before.clamp(min=1e-30)
    return z


class AffinityMeter:
    """The running mean of the affinity matrices it is given (``update``), ``value()``."""

    def __init__(self, num_tasks: int) -> None:
        self.total = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.count = 0

    def update(self, affinity: Tensor) -> None:
        self.total += affinity.detach().double().cpu()
        self.count += 1

    def value(self) -> Tensor:
        return self.total / max(self.count, 1)


def relation_from_affinity(
    affinity: Tensor, strength: float = 0.1, symmetric: bool = True
) -> Tensor:
    """A relation matrix ``R`` for the coupled loss from an affinity matrix: ``strength``
    times the affinity (symmetrised by default), normalised to a largest magnitude of 1,
    with a zero diagonal (a task's coupling with itself would only rescale its loss). With
    positive ``R[i, j]`` the total grows with ``L_i L_j``: tasks that help each other are
    pushed down together."""
    a = affinity.double().clone()
    if symmetric:
        a = (a + a.T) / 2
    a.fill_diagonal_(0)
    scale = a.abs().max()
    if scale > 0:
        a = a / scale
    return (strength * a).float()


def group_score(affinity: Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Total within-group affinity: the sum of ``affinity[i, j]`` over ordered pairs i != j of
    the same group."""
    a = affinity.double()
    total = 0.0
    for g in groups:
        idx = list(g)
        block = a[idx][:, idx]
        total += float(block.sum() - block.diagonal().sum())
    return total


def _partitions(items: list[int], k: int) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into exactly ``k`` non-empty groups (each once)."""
    if k == 1:
        yield [items]
        return
    if len(items) == k:
        yield [[i] for i in items]
        return
    if len(items) < k:
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest, k - 1):  # first alone
        yield [[first], *part]
    for part in _partitions(rest, k):  # first joins a group
        for g in range(k):
            yield [[first, *grp] if n == g else grp for n, grp in enumerate(part)]


def group_tasks(affinity: Tensor, num_groups: int) -> list[list[int]]:
    """The partition of the tasks into ``num_groups`` non-empty groups that maximises
    :func:`group_score`. Exact (every partition is scored) for up to :data:`EXACT_MAX_TASKS`
    tasks; beyond, a heuristic: agglomerative merging of the pair of groups with the largest
    affinity between them, then single-task moves while they raise the score."""
    t = affinity.shape[0]
    if affinity.shape != (t, t):
        raise ValueError(f"affinity must be square, got {tuple(affinity.shape)}")
    if not 1 <= num_groups <= t:
        raise ValueError(f"num_groups must be in [1, {t}], got {num_groups}")
    tasks = list(range(t))
    if t <= EXACT_MAX_TASKS:
        best = max(_partitions(tasks, num_groups), key=lambda p: group_score(affinity, p))
        return sorted(sorted(g) for g in best)
    a = affinity.double()
    sym = a + a.T
    groups = [[i] for i in tasks]
    while len(groups) > num_groups:
        pairs = itertools.combinations(range(len(groups)), 2)
        i, j = max(pairs, key=lambda ij: float(sym[groups[ij[0]]][:, groups[ij[1]]].sum()))
        groups[i] = groups[i] + groups[j]
        del groups[j]
    improved = True
    while improved:
        improved = False
        for task in tasks:
            src = next(n for n, g in enumerate(groups) if task in g)
            if len(groups[src]) == 1:
                continue
            base = group_score(affinity, groups)
            for dst in range(len(groups)):
                if dst == src:
                    continue
                trial = [list(g) for g in groups]
                trial[src].remove(task)
                trial[dst].append(task)
                if group_score(affinity, trial) > base + 1e-12:
                    groups, improved = trial, True
                    break
    return sorted(sorted(g) for g in groups)
