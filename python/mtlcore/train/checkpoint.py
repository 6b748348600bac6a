"""Checkpoints written atomically: a crash mid-save never destroys the previous one."""

from __future__ import annotations

import glob
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "get_rng_state",
    "load_checkpoint",
    "remove_stale_temporaries",
    "save_checkpoint",
    "set_rng_state",
]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``state`` with ``torch.save`` to a temporary file in the same folder, flushes it to
    disk (fsync), then renames it over ``path`` (atomic on POSIX) and syncs the folder. A reader
    sees either the previous checkpoint or the new one, whole.

    The temporary file's name carries the host and process id of its writer; after a successful
    save, the temporary files of ``path`` that a killed writer on this host left behind (its
    process no longer runs) are deleted. A running writer's file is never touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{socket.gethostname()}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    remove_stale_temporaries(path)
    return path


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of ``path`` that saves killed mid-write left behind: written
    on this host by a process that no longer runs. Files of running processes, of other hosts
    (a shared folder) or not named by :func:`save_checkpoint` are kept. POSIX only (elsewhere
    nothing is deleted). Returns the deleted files."""
    path = Path(path)
    if os.name != "posix":
        return []
    host, removed = socket.gethostname(), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        # .<name>.<host>.<pid>.<random>.tmp; the host may hold dots, the rest does not.
        fields = tmp.name[len(path.name) + 2 : -len(".tmp")].rsplit(".", 2)
        if len(fields) != 3 or fields[0] != host or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid() or _process_exists(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`, tensors on ``map_location``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def get_rng_state() -> dict[str, Any]:
    """The states of Python's, torch's CPU and every CUDA device's generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
