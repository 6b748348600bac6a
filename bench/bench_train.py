"""End-to-end training step of SmallCNN with two heads (Shapes' shape and colour, batch 64,
3x32x32): mtlcore's fused modules + fused loss + fused optimizer vs the same model in plain
PyTorch eager (nn.Conv2d + relu, F.cross_entropy, torch.optim.Adam(fused=True)), both from the
same initial weights; images/s in the same run, and the two losses step by step over 20 steps.

    python bench/bench_train.py [--device cuda] [--quick]

Results: bench/results/train_<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compare, machine, write_results

import mtlcore
from mtlcore.data import Shapes
from mtlcore.train.plain import fused_step, plain_step, twin_models

BATCH = 64
STEPS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
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
    worst = 0.0
    for step, (x, y) in enumerate(batches):
        a = float(fused_step(fused, loss, fused_opt, x, y))
        b = float(plain_step(plain, plain_opt, tasks, x, y))
        worst = max(worst, abs(a - b) / abs(b))
        print(f"step {step:2d}: loss fused {a:.6f}  plain {b:.6f}")
    print(f"largest relative difference over {STEPS} steps: {worst:.2e}")

    x, y = batches[0]
    times = compare(
        {
            "fused": lambda: fused_step(fused, loss, fused_opt, x, y),
            "plain": lambda: plain_step(plain, plain_opt, tasks, x, y),
        },
        args.rounds,
        0.3 if args.quick else 1.0,
    )
    row = {
        "speedup": times["plain"] / times["fused"],
        "fused_images_per_s": BATCH / times["fused"],
        "plain_images_per_s": BATCH / times["plain"],
        "max_rel_loss_diff_20_steps": worst,
    }
    print(
        f"fused {row['fused_images_per_s']:.0f} images/s, plain {row['plain_images_per_s']:.0f} "
        f"images/s: {row['speedup']:.2f}x"
    )
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
