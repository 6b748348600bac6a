"""`python -m mtlcore train` with a slow disk: every fsync first sleeps, which widens the window
in which a checkpoint is being written, so tests/test_crash_safety.py can kill the process
mid-checkpoint on purpose. The training code itself is unchanged.

Usage: python tests/crash_worker.py <fsync delay in seconds> <train arguments...>
"""

from __future__ import annotations

import os
import sys
import time

from mtlcore.cli import main

if __name__ == "__main__":
    delay = float(sys.argv[1])
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(delay)
        real_fsync(fd)

    os.fsync = slow_fsync
    sys.exit(main(["train", *sys.argv[2:]]))
