"""Shared fixtures: every device test runs on CPU and, where one exists, on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

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


class CompiledOnce:
    """``fn`` under ``torch.compile(fullgraph=True, dynamic=True)`` (backend aot_eager) that
    fails a call which traces again: the first call may trace twice (dynamo restarts once to
    specialise float hyperparameters), a later call with new sizes must reuse that graph (a
    fake kernel that specialised a size would make it trace again)."""

    def __init__(self, fn):
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        self.counter = CompileCounterWithBackend("aot_eager")
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=self.counter)
        self.traces = 0

    def __call__(self, *args):
        out = self.compiled(*args)
        if self.traces == 0:
            self.traces = self.counter.frame_count
        assert self.counter.frame_count == self.traces, "traced again for new sizes"
        return out


def assert_double_backward_raises(out: torch.Tensor, inputs: list[torch.Tensor], op: str) -> None:
    """Our backward kernels have no derivative: gradients of ``out`` computed with
    create_graph=True must equal the plain ones (and come without PyTorch's "autograd kernel
    was not registered" warning), and differentiating them must raise an error naming ``op``,
    both through ``backward()`` and through ``torch.autograd.grad`` (not count as constants,
    which would make a second derivative silently zero)."""
    import warnings

    plain = torch.autograd.grad(out, inputs, retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = torch.autograd.grad(out, inputs, create_graph=True)
    for g, p in zip(grads, plain, strict=True):
        assert torch.equal(g, p)
        assert g.requires_grad
    match = f"mtlcore.{op}: double backward is not supported"
    with pytest.raises(RuntimeError, match=match):
        torch.autograd.grad(sum((g * g).sum() for g in grads), inputs, retain_graph=True)
    with pytest.raises(RuntimeError, match=match):
        sum((g * g).sum() for g in grads).backward()


def assert_nested_func_grad_raises(fn, x: torch.Tensor, op: str) -> None:
    """A second derivative through torch.func's nested transforms (grad of grad) raises too:
    the outer level sees our backward op (below the inner level's graph node), whose Autograd
    kernel refuses to be differentiated instead of PyTorch's default warning and zero."""
    with pytest.raises(RuntimeError, match=f"derivative for mtlcore::{op}.* is not implemented"):
        torch.func.grad(lambda x: (torch.func.grad(fn)(x) ** 2).sum())(x)


# Hypothesis profiles for tests/test_fuzz.py: "ci" (the default) replays a fixed seed with a
# bounded number of examples so `make test` stays quick and reproducible; "long" (`make fuzz`)
# draws fresh random cases, many more of them.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test dependency; without it test_fuzz.py fails to import
    pass
else:
    _slow = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile(
        "ci", max_examples=40, derandomize=True, deadline=None, suppress_health_check=_slow
    )
    settings.register_profile(
        "long", max_examples=2000, deadline=None, suppress_health_check=_slow, print_blob=True
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def assert_device_side_assertion(script: str) -> None:
    """Runs `script` (CUDA work, then a synchronisation) in a child process and checks that it
    failed on a device-side assertion. A child: the assertion leaves the CUDA context
    unusable."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode != 0
    assert "assert" in out.stderr.lower()
