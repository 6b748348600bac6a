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


def test_trainer_measures_affinity_and_its_cost():
    from mtlcore import Task
    from mtlcore.data import Shapes
    from mtlcore.models import SmallCNN
    from mtlcore.nn import LinearHead, MultiTaskModel
    from mtlcore.train import Trainer

    tasks = [Task("shape", "ce", 3), Task("size", "mse", 1)]
    torch.manual_seed(0)
    model = MultiTaskModel(SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in tasks})
    trainer = Trainer(
        model,
        tasks,
        torch.optim.SGD(model.parameters(), lr=0.01),
        batch_size=16,
        affinity_every=2,
    )
    trainer.fit(Shapes(64, image_size=16), epochs=1)
    z = trainer.affinity()
    assert z.shape == (2, 2) and torch.isfinite(z).all()
    assert trainer.affinity_meter.count == 2
    assert z[0, 0] > 0 and z[1, 1] > 0  # a step on a task lowers its own loss
    assert 0 < trainer.seconds["affinity"] < trainer.seconds["train"]


def test_grouped_model_has_one_trunk_per_group():
    from mtlcore.models import SmallCNN
    from mtlcore.nn import GroupedModel, LinearHead

    heads = {n: LinearHead(128, 2) for n in "abc"}
    model = GroupedModel(lambda: SmallCNN(3, 16), heads, [["a", "c"], ["b"]])
    out = model(torch.randn(2, 3, 16, 16))
    assert set(out) == {"a", "b", "c"} and len(model.branches) == 2
    assert model.branches[0].trunk is not model.branches[1].trunk
    out["b"].sum().backward()
    assert model.branches[0].trunk.fc.weight.grad is None  # b's loss reaches only its trunk
    with pytest.raises(ValueError, match="exactly once"):
        GroupedModel(lambda: SmallCNN(3, 16), heads, [["a"], ["b"]])


def test_cli_affinity(tmp_path):
    import subprocess
    import sys

    args = f"affinity --data shapes --samples 64 --batch-size 16 --every 2 --out {tmp_path}"
    proc = subprocess.run(
        [sys.executable, "-m", "mtlcore", *args.split()], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "best grouping into 2" in proc.stdout and "measuring cost" in proc.stdout
    assert (tmp_path / "affinity.json").is_file() and (tmp_path / "affinity.png").is_file()
