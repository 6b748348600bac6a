"""Shared helpers of mtlcore's benchmarks: timing, the machine's bandwidth ceiling, results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

RESULTS_DIR = Path(os.environ.get("OUT") or Path(__file__).parent / "results")


def time_fn(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call of ``fn`` (torch.utils.benchmark; syncs CUDA)."""
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m.blocked_autorange(min_run_time=min(0.2, min_run_time))  # warm-up: caches, threads, clocks
    return m.blocked_autorange(min_run_time=min_run_time).median


def compare(
    fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float
) -> dict[str, float]:
    """Median time of each function over ``rounds`` interleaved measurements, so that drifts of a
    noisy machine hit every contender alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, min_run_time))
    return {k: statistics.median(v) for k, v in samples.items()}


def copy_bandwidth(device: torch.device, numel: int, rounds: int, min_run_time: float) -> float:
    """Bytes per second of a large tensor copy (bytes read + bytes written): the practical
    memory-bandwidth ceiling measured in this run."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    t = compare({"copy": lambda: dst.copy_(src)}, rounds, min_run_time)["copy"]
    return 2 * src.numel() * src.element_size() / t


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(name: str, payload: dict[str, object]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict[str, object]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths, strict=True)))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
