"""Trains the test model of test_distributed.py, under torchrun or alone; rank 0 saves the
parameters (every rank saves OUT_FILE.rank<r> too when a weighting is given).
Usage: python ddp_worker.py OUT_FILE BATCH_PER_RANK [OUT_DIR|-] [WEIGHTING]
(DDP_WORKER_COMPILE=1: the Trainer trains through torch.compile, backend aot_eager)"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
from torch import distributed as dist

from mtlcore import Task, optim
from mtlcore.data import Shapes
from mtlcore.models import SmallCNN
from mtlcore.nn import LinearHead, MultiTaskModel
from mtlcore.train import Trainer

TASKS = [Task("shape", "ce", 3), Task("colour", "ce", 4), Task("size", "mse", 1)]


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux; elsewhere none are seen)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()]
    return [n for n in names if "gloo" in n]


def main(out: str, batch: int, out_dir: str | None, weighting: str | None = None) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MultiTaskModel(SmallCNN(3, 16), {t.name: LinearHead(128, t.num_outputs) for t in TASKS})
    trainer = Trainer(
        model,
        TASKS,
        optim.Adam(model.parameters(), lr=2e-3),
        batch_size=batch,
        seed=5,
        out_dir=out_dir,
        progress=False,
        compile={"backend": "aot_eager"} if os.environ.get("DDP_WORKER_COMPILE") else False,
    )
    trainer.fit(Shapes(96, image_size=16, seed=1), epochs=2)
    if trainer.is_main:
        torch.save({"params": model.state_dict(), "history": trainer.history}, out)
    if weighting:
        torch.save(model.state_dict(), f"{out}.rank{trainer.rank}")
    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        # Once the trainer (its DDP wrapper) is gone, nothing keeps the group: its threads
        # end here, not in the interpreter's shutdown.
        del trainer, model
        gc.collect()
        left = gloo_threads()
        assert not left, f"rank {rank}: gloo threads still run: {left}"


if __name__ == "__main__":
    out_dir = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    main(sys.argv[1], int(sys.argv[2]), out_dir, sys.argv[4] if len(sys.argv) > 4 else None)
