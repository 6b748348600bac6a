"""Distributed data parallel on the CPU: 2 processes with gloo (launched by torchrun) end with
the parameters of a 1-process run on the full batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_gloo_processes_match_one_process_on_the_full_batch(tmp_path, compiled):
    """Compiled: the 2 ranks train through torch.compile of the DDP module (graph split at
    DDP's buckets); the 1-process run they must match is eager."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    out_dir = tmp_path / "run"
    launch = [*torchrun(), "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.run(
        [*launch, str(two), "16", str(out_dir)],
        env={**env, "DDP_WORKER_COMPILE": "1"} if compiled else env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(one), "32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(two), torch.load(one)
    for name, p in b["params"].items():
        torch.testing.assert_close(a["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        for k in row_b:
            assert row_a[k] == pytest.approx(row_b[k], rel=1e-5)
    # Only rank 0 wrote files, and a single checkpoint.
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        ["checkpoint.pt", "history.csv", "history.json", "loss.png"]
    )
    shutil.rmtree(out_dir)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_gradient_based_weighting_keeps_the_ranks_in_step(tmp_path):
    """PCGrad sets the gradients itself (no DDP hooks): they are averaged by hand, so both
    ranks end with the same parameters."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pc.pt"
    launch = [*torchrun(), "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.run(
        [*launch, str(out), "16", "-", "pcgrad"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(f"{out}.rank0"), torch.load(f"{out}.rank1")
    for name, p in r0.items():
        assert torch.equal(p, r1[name]), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_train_job_under_torchrun_destroys_the_group_it_created(tmp_path):
    """`torchrun -m mtlcore train` (README): the job joins a gloo group, trains, evaluates on
    every rank, and destroys the group before it returns."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("ddp_job_worker.py")
    launch = [*torchrun(), "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(
        [*launch, str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracies = [
        float(line.split()[1])
        for line in proc.stdout.splitlines()
        if line.startswith("job-accuracy")
    ]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1], proc.stdout
    assert (tmp_path / "run" / "checkpoint.pt").exists()
