"""Soak test: train for many epochs (up to --minutes) and check that memory stays flat.

Every epoch runs the whole training path: the fused conv, loss and optimizer kernels, a
gradient-based weighting (per-task backward passes), evaluation, history files, plots and an
atomic checkpoint. The resident set size (RSS, and on CUDA the allocated device memory) is read
after each epoch. After a warm-up (caches, allocator pools, matplotlib), memory must not grow:
the median of the last epochs may exceed the level at the end of the warm-up by at most
max(32 MiB, 5%). Exits 1 when it does.

    python bench/soak.py [--minutes 30] [--device cuda] [--weighting pcgrad]

`make soak` runs it for 30 minutes; results: bench/results/soak_<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_results

from mtlcore import optim, weighting
from mtlcore.data import Shapes
from mtlcore.train import Trainer
from mtlcore.train.job import build_model

MIB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def growth(samples: list[int], warmup: int) -> tuple[int, int, float]:
    """(level after warm-up, median of the last 5 epochs, least-squares slope per epoch)."""
    level = samples[warmup - 1]
    tail = samples[warmup:]
    last = statistics.median(samples[-5:])
    xs = range(len(tail))
    mx, my = statistics.fmean(xs), statistics.fmean(tail)
    var = sum((x - mx) ** 2 for x in xs) or 1.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, tail, strict=True)) / var
    return level, int(last), slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--weighting", default="pcgrad")
    parser.add_argument("--min-epochs", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    train = Shapes(args.samples, seed=0)
    val = Shapes(max(args.samples // 4, 64), "test", seed=0)
    tasks = train.tasks()
    model = build_model(tasks, 3, train.image_size)
    strategy = weighting.get(args.weighting, len(tasks)) if args.weighting else None
    params = list(model.parameters()) + (list(strategy.parameters()) if strategy else [])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model,
            tasks,
            optim.Adam(params, lr=1e-3),
            device=device,
            batch_size=32,
            out_dir=out,
            progress=False,
            weighting=strategy,
        )
        rss, cuda_mem, epochs_s = [], [], []
        start = time.perf_counter()
        deadline = start + args.minutes * 60
        while time.perf_counter() < deadline or len(rss) < args.min_epochs:
            t0 = time.perf_counter()
            row = trainer.fit(train, epochs=trainer.epoch + 1, val=val)[-1]
            epochs_s.append(time.perf_counter() - t0)
            rss.append(rss_bytes())
            if device.type == "cuda":
                cuda_mem.append(torch.cuda.memory_allocated(device))
            print(
                f"epoch {trainer.epoch:4d}  loss {row['train_loss/total']:.4f}  "
                f"RSS {rss[-1] / MIB:.1f} MiB  ({epochs_s[-1]:.1f} s)",
                flush=True,
            )
    warmup = max(10, len(rss) // 10)
    level, last, slope = growth(rss, warmup)
    allowed = max(32 * MIB, 0.05 * level)
    ok = last - level <= allowed
    result = {
        "machine": machine(device),
        "minutes": (time.perf_counter() - start) / 60,
        "epochs": len(rss),
        "warmup_epochs": warmup,
        "rss_mib": [round(r / MIB, 1) for r in rss],
        "rss_after_warmup_mib": level / MIB,
        "rss_last_mib": last / MIB,
        "growth_mib": (last - level) / MIB,
        "allowed_growth_mib": allowed / MIB,
        "slope_mib_per_epoch": slope / MIB,
        "ok": ok,
    }
    if cuda_mem:
        c_level, c_last, _ = growth(cuda_mem, warmup)
        result["cuda_allocated_growth_mib"] = (c_last - c_level) / MIB
        ok = ok and c_last - c_level <= 16 * MIB
        result["ok"] = ok
    path = write_results(f"soak_{device.type}", result)
    print(
        f"{len(rss)} epochs in {result['minutes']:.1f} min: RSS {level / MIB:.1f} MiB after "
        f"{warmup} warm-up epochs, {last / MIB:.1f} MiB at the end "
        f"({(last - level) / MIB:+.1f} MiB, allowed {allowed / MIB:.0f}; slope "
        f"{slope / MIB:+.3f} MiB/epoch): {'flat' if ok else 'GROWING'}  -> {path}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
