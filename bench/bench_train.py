"""End-to-end training step of SmallCNN with two heads (Shapes' shape and colour, batch 64,
3x32x32): mtlcore's fused modules + fused loss + fused optimizer vs the same model in plain
PyTorch eager (nn.Conv2d + relu, F.cross_entropy, torch.optim.Adam(fused=True)), both from the
same initial weights; images/s in the same run (timed in the fresh process and again after the
float64 twin below has run, see time_steps), and the two losses step by step over 20 steps,
each also against a float64 twin of the plain model (the trajectory both approximate).
Then both twins train for a fixed budget on MultiFashion (Shapes when Fashion-MNIST is absent)
with the same batches, and their test accuracies are reported side by side.

    python bench/bench_train.py [--device cuda] [--quick] [--budget-epochs 1]

Results: bench/results/train_<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compare, machine, write_results

import mtlcore
from mtlcore.data import MultiFashion, Shapes, find_fashion_mnist
from mtlcore.train.plain import fused_step, plain_step, twin_models

BATCH = 64
STEPS = 20


def accuracy_after_budget(args, device) -> dict[str, float]:
    """Both twins trained on the same batches for the same budget; test accuracy per task."""
    if find_fashion_mnist() is not None:
        train = MultiFashion("train", num_samples=args.budget_samples)
        test = MultiFashion("test", num_samples=5000)
        tasks, channels, size = MultiFashion.tasks(), 1, 36
    else:
        train, test = Shapes(args.budget_samples, seed=0), Shapes(2000, "test", seed=0)
        tasks = [t for t in train.tasks() if t.name in ("shape", "colour")]
        channels, size = 3, 32
    (fused, loss, fused_opt), (plain, plain_opt) = twin_models(tasks, channels, size)
    fused.to(device), loss.to(device), plain.to(device)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.budget_epochs):
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(train) - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            x = train.images[idx].to(device)
            y = {t.name: train.targets[t.name][idx].to(device) for t in tasks}
            fused_step(fused, loss, fused_opt, x, y)
            plain_step(plain, plain_opt, tasks, x, y)
    out = {}
    with torch.no_grad():
        for name, model in (("fused", fused), ("plain", plain)):
            model.eval()
            preds = {t.name: [] for t in tasks}
            for i in range(0, len(test), 500):
                o = model(test.images[i : i + 500].to(device))
                for t in tasks:
                    preds[t.name].append(o[t.name].argmax(1).cpu())
            for t in tasks:
                acc = (torch.cat(preds[t.name]) == test.targets[t.name]).float().mean().item()
                out[f"{name}_{t.name}_accuracy"] = acc
    print(f"after {args.budget_epochs} epoch(s) of {len(train)} {type(train).__name__} images:")
    for t in tasks:
        print(
            f"  {t.name}: test accuracy fused {out[f'fused_{t.name}_accuracy']:.4f}, "
            f"plain {out[f'plain_{t.name}_accuracy']:.4f}"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-epochs", type=int, default=1)
    ap.add_argument("--budget-samples", type=int, default=20000)
    args = ap.parse_args()
    device = torch.device(args.device)
    data = Shapes(BATCH * STEPS, seed=0)
    tasks = [t for t in data.tasks() if t.name in ("shape", "colour")]
    (fused, loss, fused_opt), (plain, plain_opt) = twin_models(tasks, 3, 32)
    fused.to(device), loss.to(device), plain.to(device)
    batches = [
        (
            data.images[i : i + BATCH].to(device),
            {t.name: data.targets[t.name][i : i + BATCH].to(device) for t in tasks},
        )
        for i in range(0, BATCH * STEPS, BATCH)
    ]

    # The timed pair is a second pair of twins, so that timing leaves the compared pair as it is.
    (t_fused, t_loss, t_fused_opt), (t_plain, t_plain_opt) = twin_models(tasks, 3, 32, seed=1)
    t_fused.to(device), t_loss.to(device), t_plain.to(device)

    def time_steps() -> dict[str, float]:
        x, y = batches[0]
        return compare(
            {
                "fused": lambda: fused_step(t_fused, t_loss, t_fused_opt, x, y),
                "plain": lambda: plain_step(t_plain, t_plain_opt, tasks, x, y),
            },
            args.rounds,
            0.3 if args.quick else 1.0,
        )

    # Timed twice: first in this fresh process, then after the float64 twin below has run. Its
    # large blocks raise glibc's mmap and trim thresholds, after which plain PyTorch's
    # multi-megabyte tensors no longer come from fresh pages (in the fresh process they cost it
    # thousands of page faults per step; mtlcore's ops keep their outputs' memory either way).
    fresh = time_steps()
    # A float64 twin of the plain model, stepped on the same batches: the exact trajectory
    # that both float32 models approximate.
    exact = copy.deepcopy(plain).double()
    exact_opt = torch.optim.Adam(exact.parameters(), lr=plain_opt.defaults["lr"])
    worst = worst_fused = worst_plain = 0.0
    for step, (x, y) in enumerate(batches):
        a = float(fused_step(fused, loss, fused_opt, x, y))
        b = float(plain_step(plain, plain_opt, tasks, x, y))
        e = float(plain_step(exact, exact_opt, tasks, x.double(), y))
        worst = max(worst, abs(a - b) / abs(b))
        worst_fused = max(worst_fused, abs(a - e) / e)
        worst_plain = max(worst_plain, abs(b - e) / e)
        print(f"step {step:2d}: loss fused {a:.7f}  plain {b:.7f}  float64 {e:.7f}")
    print(
        f"largest relative difference over {STEPS} steps: fused vs plain {worst:.2e}; "
        f"against float64: fused {worst_fused:.2e}, plain {worst_plain:.2e}"
    )

    times = time_steps()
    row = {
        "speedup": times["plain"] / times["fused"],
        "fused_images_per_s": BATCH / times["fused"],
        "plain_images_per_s": BATCH / times["plain"],
        "speedup_fresh_process": fresh["plain"] / fresh["fused"],
        "fused_images_per_s_fresh_process": BATCH / fresh["fused"],
        "plain_images_per_s_fresh_process": BATCH / fresh["plain"],
        "max_rel_loss_diff_20_steps": worst,
        "fused_max_rel_loss_diff_vs_float64": worst_fused,
        "plain_max_rel_loss_diff_vs_float64": worst_plain,
    }
    print(
        f"fused {row['fused_images_per_s']:.0f} images/s, plain {row['plain_images_per_s']:.0f} "
        f"images/s: {row['speedup']:.2f}x (fresh process: fused "
        f"{row['fused_images_per_s_fresh_process']:.0f}, plain "
        f"{row['plain_images_per_s_fresh_process']:.0f}: {row['speedup_fresh_process']:.2f}x)"
    )
    row.update(accuracy_after_budget(args, device))
    path = write_results(
        f"train_{device.type}",
        {
            "benchmark": "bench_train",
            "machine": machine(device),
            "build": mtlcore.build_info(),
            "batch": BATCH,
            **row,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
