"""Task affinity, relation matrices and task grouping."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtlcore import relations as rel


def brute_force_grouping(affinity, k):
    """Every labelling of the tasks with k labels that uses all of them."""
    t = affinity.shape[0]
    best, best_groups = -float("inf"), None
    for labels in itertools.product(range(k), repeat=t):
        if len(set(labels)) != k:
            continue
        groups = [[i for i in range(t) if labels[i] == g] for g in range(k)]
        score = rel.group_score(affinity, groups)
        if score > best + 1e-12:
            best, best_groups = score, groups
    return best, best_groups


@pytest.mark.parametrize(
    ("seed", "t", "k"), [(0, 4, 2), (1, 5, 2), (2, 6, 3), (3, 7, 3), (4, 5, 4)]
)
def test_exact_grouping_finds_the_brute_force_optimum(seed, t, k):
    g = torch.Generator().manual_seed(seed)
    affinity = torch.randn(t, t, generator=g)
    groups = rel.group_tasks(affinity, k)
    assert sorted(i for grp in groups for i in grp) == list(range(t)) and len(groups) == k
    best, _ = brute_force_grouping(affinity, k)
    assert rel.group_score(affinity, groups) == pytest.approx(best)


def test_grouping_recovers_planted_clusters_beyond_the_exact_size():
    t = 14
    truth = [list(range(0, 5)), list(range(5, 9)), list(range(9, 14))]
    affinity = -torch.ones(t, t)
    for grp in truth:
        for i in grp:
            for j in grp:
                affinity[i, j] = 1.0
    affinity += 0.05 * torch.randn(t, t, generator=torch.Generator().manual_seed(0))
    assert rel.group_tasks(affinity, 3) == truth
    with pytest.raises(ValueError, match="num_groups must be in"):
        rel.group_tasks(affinity, 0)


def test_partitions_are_counted_by_stirling_numbers():
    # S(6, 3) = 90 partitions of 6 items into 3 non-empty groups, each once.
    parts = list(rel._partitions(list(range(6)), 3))
    canonical = {tuple(sorted(tuple(sorted(g)) for g in p)) for p in parts}
    assert len(parts) == len(canonical) == 90


def test_gradient_cosine_and_relation_helper():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    cos = rel.gradient_cosine(grads)
    torch.testing.assert_close(cos[0], torch.tensor([1.0, 2**-0.5, -1.0]))
    r = rel.relation_from_affinity(torch.tensor([[5.0, 2.0], [0.0, 5.0]]), strength=0.2)
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.2], [0.2, 0.0]]))


def test_lookahead_affinity_on_a_linear_model():
    """Two regression tasks sharing one weight vector: task 1 wants the same as task 0,
    task 2 the opposite. A step on task 0 lowers task 1's loss and raises task 2's."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    x = torch.randn(64, 3)
    target = x @ torch.tensor([1.0, -2.0, 0.5])

    def losses():
        pred = x @ w
        return torch.stack(
            [
                (pred - target).square().mean(),
                (pred - 0.9 * target).square().mean(),
                (pred + target).square().mean(),
            ]
        )

    before = w.detach().clone()
    z = rel.lookahead_affinity(losses, [w], lr=0.05)
    assert torch.equal(w.detach(), before)  # restored
    assert z[0, 1] > 0 and z[0, 2] < 0 and z[0, 0] > 0
    meter = rel.AffinityMeter(3)
    meter.update(z)
    meter.update(z)
    torch.testing.assert_close(meter.value(), z)
