"""Evidence for the weighting strategies and task grouping: single-task baselines, equal
weighting, uncertainty, DWA, PCGrad, MGDA-UB, CAGrad and a grouped model (one trunk per group
of the lookahead-affinity grouping), same budget and seeds; per-task test metrics, the
multi-task gain Δm% against the single-task models of the same seed, and the time per training
step relative to equal weighting. Mean ± std over the seeds.

    python bench/compare_weighting.py --data shapes|multifashion [--seeds 3] [--epochs 2]
        [--samples 4000]

Results: bench/results/weighting_<data>.json (or under $OUT) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results

import mtlcore
from mtlcore import optim
from mtlcore.models import SmallCNN
from mtlcore.nn import GroupedModel
from mtlcore.relations import group_tasks
from mtlcore.tasks import multitask_gain
from mtlcore.train import Trainer
from mtlcore.train.job import build_model, load_data, make_trainer

METHODS = ["equal", "uncertainty", "dwa", "pcgrad", "mgda", "cagrad", "grouped"]


def train_once(tasks, train, test, channels, size, args, seed, method=None, model=None):
    trainer = make_trainer(
        tasks,
        channels,
        size,
        seed=seed,
        weighting=None if method == "grouped" else method,
        lr=args.lr,
        batch_size=args.batch_size,
        model=model,
        progress=False,
    )
    trainer.fit(train, epochs=args.epochs)
    steps = args.epochs * -(-len(train) // args.batch_size)
    return trainer.evaluate(test), trainer.seconds["train"] / steps


def grouping(tasks, train, channels, size, args) -> list[list[str]]:
    """The two-group partition of the lookahead affinity measured over one short epoch."""
    torch.manual_seed(0)
    model = build_model(tasks, channels, size)
    trainer = Trainer(
        model,
        tasks,
        optim.Adam(model.parameters(), lr=args.lr),
        batch_size=args.batch_size,
        progress=False,
        affinity_every=5,
    )
    trainer.fit(train, epochs=1)
    return [[tasks[i].name for i in g] for g in group_tasks(trainer.affinity(), 2)]


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shapes", choices=["shapes", "multifashion"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    train, test, tasks, channels, size = load_data(args.data, args.samples, 0, None, print)
    groups = grouping(tasks, train, channels, size, args)
    print(f"grouping from the affinity: {groups}", flush=True)

    results: dict[str, list] = {m: [] for m in ["single-task", *METHODS]}
    seconds: dict[str, list] = {m: [] for m in results}
    for seed in range(args.seeds):
        single = {}
        for task in tasks:
            r, _ = train_once([task], train, test, channels, size, args, seed)
            single[task.name] = r[task.name]
        results["single-task"].append({"metrics": single, "delta_m": 0.0})
        for method in METHODS:
            model = None
            if method == "grouped":
                torch.manual_seed(seed)  # the same initial heads for every run of this seed
                heads = build_model(tasks, channels, size).heads
                model = GroupedModel(lambda: SmallCNN(channels, size), dict(heads), groups)
            r, per_step = train_once(tasks, train, test, channels, size, args, seed, method, model)
            gain = multitask_gain(tasks, r, single)
            results[method].append({"metrics": r, "delta_m": gain})
            seconds[method].append(per_step)
            print(
                f"seed {seed} {method:12s} Δm {gain:+.2f}%  {1e3 * per_step:.1f} ms/step",
                flush=True,
            )

    main_metric = {t.name: t.metric_names[0] for t in tasks}
    rows = []
    equal_time = statistics.mean(seconds["equal"])
    for method, runs in results.items():
        row = {"method": method}
        for t in tasks:
            m = main_metric[t.name]
            row[f"{t.name} {m}"] = mean_std([run["metrics"][t.name][m] for run in runs])
        row["delta_m"] = mean_std([run["delta_m"] for run in runs])
        if seconds[method]:
            row["time_vs_equal"] = statistics.mean(seconds[method]) / equal_time
        rows.append(row)
    columns = [f"{t.name} {main_metric[t.name]}" for t in tasks]
    print("\n| method | " + " | ".join(columns) + " | Δm% | step time vs equal |")
    print("| --- |" + " ---: |" * (len(columns) + 2))
    for row in rows:
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in columns]
        dm = f"{row['delta_m'][0]:+.2f} ± {row['delta_m'][1]:.2f}"
        tv = f"{row['time_vs_equal']:.2f}x" if "time_vs_equal" in row else "-"
        print(f"| {row['method']} | " + " | ".join(cells) + f" | {dm} | {tv} |")
    path = write_results(
        f"weighting_{args.data}",
        {
            "benchmark": "compare_weighting",
            "machine": machine(torch.device("cpu")),
            "build": mtlcore.build_info(),
            "args": vars(args),
            "groups": groups,
            "rows": rows,
            "runs": {k: v for k, v in results.items()},
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
