"""mtlcore: fused C++/CUDA kernels for multi-task learning in PyTorch.

The compiled operators live in ``torch.ops.mtlcore``; :mod:`mtlcore.ops` wraps them with Python
conveniences and registers their fake kernels and autograd. :mod:`mtlcore.optim` holds drop-in
optimizers on the fused update ops, and :mod:`mtlcore.reference` pure-PyTorch versions of every
op (the oracle of the tests).
"""

from __future__ import annotations

import torch  # loads libtorch before the extension that links against it

from mtlcore import _C, data, models, nn, ops, optim, reference, relations, weighting
from mtlcore.tasks import Task

__all__ = [
    "Task",
    "__version__",
    "build_info",
    "cpu_cache_stats",
    "data",
    "empty_cpu_cache",
    "models",
    "nn",
    "ops",
    "optim",
    "reference",
    "relations",
    "set_cpu_cache_limit",
    "weighting",
]


def build_info() -> dict[str, object]:
    """How this copy of mtlcore was built and how it runs now.

    Returns a dict with ``version``, ``torch`` (the torch it was compiled against),
    ``torch_runtime`` (the torch imported now), ``cuda`` (whether CUDA kernels were compiled),
    ``cuda_archs`` (list of CUDA architectures), ``cuda_available``, ``cpu_isa`` (the CPU
    vector path in use: base, avx2 or avx512), ``cpu_isa_supported``, ``openmp`` and
    ``threads`` (``torch.get_num_threads()``).
    """
    info = dict(_C.build_info())
    archs = str(info["cuda_archs"])
    info["cuda_archs"] = archs.split(",") if archs else []
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = bool(info["cuda"]) and torch.cuda.is_available()
    info["threads"] = torch.get_num_threads()
    return info


def cpu_cache_stats() -> dict[str, int]:
    """Counters of the cache that keeps the memory of the ops' large CPU outputs.

    The CPU kernels' outputs of 64 kB and more (activations, gradients) are allocated from a
    cache: when such a tensor dies its memory is kept and handed to the next output of the same
    size, so a training loop does not fault in fresh pages for them every step. Returns
    ``limit_bytes`` (the most it keeps: ``MTLCORE_CPU_CACHE_MB`` megabytes, default 256, or
    :func:`set_cpu_cache_limit`'s), ``cached_bytes`` and ``cached_blocks`` (kept now, not in
    use), ``allocated_bytes`` (in live tensors), ``hits`` and ``misses`` (requests served from
    kept memory, and those that allocated).
    """
    return {str(k): int(v) for k, v in _C.cpu_cache_stats().items()}


def empty_cpu_cache() -> None:
    """Frees the memory the CPU output cache keeps (live tensors are not affected)."""
    _C.empty_cpu_cache()


def set_cpu_cache_limit(nbytes: int) -> None:
    """Sets the most bytes the CPU output cache keeps; 0 turns it off. Kept memory above the
    new limit is freed at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"mtlcore.set_cpu_cache_limit: nbytes must be an int >= 0, got {nbytes!r}")
    _C.set_cpu_cache_limit(nbytes)


__version__: str = str(_C.build_info()["version"])
