"""Shared fixtures: every device test runs on CPU and, where one exists, on CUDA."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def dtypes_for(device: str) -> list[torch.dtype]:
    """Parameter dtypes the update ops support on ``device``."""
    if device == "cpu":
        return [torch.float32, torch.float64]
    return [torch.float32, torch.float64, torch.float16, torch.bfloat16]
