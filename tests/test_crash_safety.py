"""Crash safety of training: `python -m mtlcore train --resume` killed with SIGKILL 20 times, at
random points of an epoch (after each process has saved at least once, so every restart resumes
from a later checkpoint) and on purpose while a checkpoint is being written, then run to the
end.

After every kill the last complete checkpoint must load; the run that finally completes must
end with bitwise the parameters, optimizer state and history of an uninterrupted run.
tests/crash_worker.py slows fsync down so that "while a checkpoint is being written" is a
window the test can hit reliably; the training code is the product's, unchanged.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtlcore.train.checkpoint import load_checkpoint

WORKER = Path(__file__).with_name("crash_worker.py")
EPOCHS = 40
KILLS = 20
ARGS = [
    "--data", "shapes", "--samples", "32", "--batch-size", "16", "--epochs", str(EPOCHS),
    "--optimizer", "adam", "--no-progress", "--resume",
]  # fmt: skip
FSYNC_DELAY = "0.05"


def start(out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.Popen(
        [sys.executable, str(WORKER), FSYNC_DELAY, *ARGS, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def temp_files(out: Path) -> list[Path]:
    return sorted(out.glob(".checkpoint.pt.*.tmp")) if out.exists() else []


def checkpoint_id(out: Path) -> int | None:
    """The checkpoint file's inode: each save renames a new file over it."""
    try:
        return (out / "checkpoint.pt").stat().st_ino
    except FileNotFoundError:
        return None


def kill_after_a_save(proc: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """SIGKILL at a random point of the epoch after this process's first checkpoint (in
    training, plotting, or writing the next checkpoint); False if the run ended before."""
    before = checkpoint_id(out)
    while proc.poll() is None and checkpoint_id(out) == before:
        time.sleep(0.002)
    try:
        proc.wait(timeout=rng.uniform(0.0, 1.0))
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def kill_mid_checkpoint(proc: subprocess.Popen, out: Path) -> bool:
    """SIGKILL as soon as a checkpoint's temporary file exists; False if the run ended before."""
    before = set(temp_files(out))
    while proc.poll() is None:
        if set(temp_files(out)) - before:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def epoch_of(out: Path) -> int:
    path = out / "checkpoint.pt"
    return int(load_checkpoint(path)["epoch"]) if path.exists() else 0


def assert_same_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["history"] == b["history"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


@pytest.mark.slow
def test_sigkill_20_times_then_resume_matches_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "uninterrupted"
    proc = start(reference)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = mid_checkpoint = 0
    epochs_seen = [0]
    while kills < KILLS:
        proc = start(out)
        on_purpose = kills % 3 == 0
        stale = set(temp_files(out))
        killed = kill_mid_checkpoint(proc, out) if on_purpose else kill_after_a_save(proc, out, rng)
        if not killed:
            break  # the run completed before this kill
        kills += 1
        mid_checkpoint += bool(set(temp_files(out)) - stale)  # a save was cut short
        # The last complete checkpoint loads; a kill never moves it backwards, and a process
        # killed after one of its saves leaves that newer checkpoint.
        epochs_seen.append(epoch_of(out))
        assert epochs_seen[-1] >= epochs_seen[-2] + (0 if on_purpose else 1), epochs_seen
    print(f"{kills} kills, {mid_checkpoint} while a checkpoint was written; epochs {epochs_seen}")
    assert kills == KILLS, f"the run completed after {kills} kills (epochs {epochs_seen})"
    assert mid_checkpoint >= KILLS // 3 - 1, "too few kills landed while a checkpoint was written"

    proc = start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert_same_state(
        load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    )
    # The saves after the kills deleted what the killed saves left behind.
    assert temp_files(out) == [], temp_files(out)
