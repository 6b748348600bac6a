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
    "data",
    "models",
    "nn",
    "ops",
    "optim",
    "reference",
    "relations",
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


__version__: str = str(_C.build_info()["version"])
