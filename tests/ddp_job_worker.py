"""Runs `mtlcore train`'s job function under torchrun (2 ranks) and checks that the process
group it created is gone when it returns. Usage: python ddp_job_worker.py OUT_DIR"""

from __future__ import annotations

import sys

from torch import distributed as dist

from mtlcore.train.job import train_job

if __name__ == "__main__":
    results = train_job(
        data="shapes", samples=128, epochs=1, batch_size=16, out_dir=sys.argv[1], progress=False
    )
    assert not dist.is_initialized(), "train_job left its process group alive"
    print("job-accuracy", results["shape"]["accuracy"], flush=True)
