"""Thread safety and determinism of the CPU kernels.

- Eight Python threads call every op at once (with several torch threads each) and must get
  bitwise the results of serial calls.
- The same inputs give bitwise-identical outputs and gradients run to run (in fresh processes)
  and for any torch thread count, for every op: the loss and the optimizers by construction
  (per-item sums added in a fixed order), and conv2d_act too, because its parallel split gives
  every output element, and every partial sum of grad_weight, to work whose extent depends on
  the shapes only (see the header of csrc/cpu/conv2d_act.cpp); max_pool2d (NCHW and
  channels_last, forward and backward) because every output and grad_input element, and its
  sum, belongs to one unit of work (see the header of csrc/cpu/max_pool2d.cpp).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from mtlcore import ops

THREADS = 8


def run_all(seed: int) -> dict[str, torch.Tensor]:
    """Every op on inputs made from ``seed``: forward results, gradients and updated tensors."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    x = torch.randn(3, 6, 13, 11, generator=g).requires_grad_()
    w = torch.randn(10, 3, 3, 3, generator=g).requires_grad_()
    b = torch.randn(10, generator=g).requires_grad_()
    y = ops.conv2d_act(x, w, b, stride=1, padding=1, groups=2, activation="silu")
    gy = torch.randn(y.shape, generator=g)
    out["conv"] = y.detach()
    out["conv.dx"], out["conv.dw"], out["conv.db"] = torch.autograd.grad(y, (x, w, b), gy)

    logits = [
        torch.randn(64, 37, generator=g).requires_grad_(),
        torch.randn(8, 5, 9, 9, generator=g).requires_grad_(),
        torch.randn(64, 3, generator=g).requires_grad_(),
    ]
    targets = [
        torch.randint(0, 37, (64,), generator=g),
        torch.randint(0, 5, (8, 9, 9), generator=g),
        torch.rand(64, 3, generator=g),
    ]
    relation = torch.randn(3, 3, generator=g) * 0.1
    total, per_task = ops.multitask_loss(
        logits, targets, ["ce", "ce", "bce"], relation=relation, label_smoothing=0.1
    )
    out["loss.total"], out["loss.per_task"] = total.detach(), per_task.detach()
    for i, grad in enumerate(torch.autograd.grad(total, logits)):
        out[f"loss.dlogits{i}"] = grad

    shapes = [(300,), (17, 9), (5000,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    bufs = [torch.randn(s, generator=g) for s in shapes]
    ops.sgd_(params, grads, bufs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    for i, (p, m) in enumerate(zip(params, bufs, strict=True)):
        out[f"sgd.p{i}"], out[f"sgd.buf{i}"] = p, m

    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    m = [torch.randn(s, generator=g) for s in shapes]
    v = [torch.rand(s, generator=g) for s in shapes]
    vmax = [t + 0.1 for t in v]
    steps = [torch.tensor(float(k)) for k in (1, 7, 300)]
    ops.adam_(
        params, grads, m, v, vmax, steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=True
    )
    for i in range(len(shapes)):
        out[f"adam.p{i}"], out[f"adam.m{i}"], out[f"adam.v{i}"] = params[i], m[i], v[i]

    # Values k / 4: ties everywhere (the first maximum takes the gradient); overlapping windows
    # (several gradients add up in one element); 2x2 stride 2 (the fast loops); more than 64
    # channels (two channel blocks of the channels_last backward).
    x = torch.randint(-8, 9, (4, 70, 30, 37), generator=g) / 4
    for fmt, name in ((torch.contiguous_format, "pool"), (torch.channels_last, "pool.cl")):
        for kernel, stride, padding, ceil_mode in ((3, 2, 1, True), (2, 2, 0, False)):
            key = f"{name}.k{kernel}"
            xp = x.contiguous(memory_format=fmt).requires_grad_()
            y = ops.max_pool2d(xp, kernel, stride, padding, ceil_mode=ceil_mode)
            gy = torch.randn(y.shape, generator=g)
            out[key] = y.detach()
            (out[f"{key}.dx"],) = torch.autograd.grad(y, xp, gy)
    return out


def digest(results: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        k: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
        for k, t in sorted(results.items())
    }


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: not bitwise equal: {differ}"


@pytest.fixture
def torch_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_concurrent_calls_match_serial_calls(torch_threads):
    torch.set_num_threads(4)
    seeds = list(range(THREADS))
    serial = {s: run_all(s) for s in seeds}
    results: dict[int, list[dict[str, torch.Tensor]]] = {s: [] for s in seeds}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(seed: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[seed].append(run_all(seed))
        except BaseException as e:  # surfaced below; a thread cannot fail the test itself
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in seeds:
        assert len(results[s]) == 3
        for r in results[s]:
            assert_bitwise(r, serial[s], f"thread with seed {s}")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_results_do_not_depend_on_the_thread_count(threads, torch_threads):
    torch.set_num_threads(1)
    baseline = run_all(123)
    torch.set_num_threads(threads)
    assert_bitwise(run_all(123), baseline, f"{threads} threads vs 1")


_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_threads import digest, run_all
torch.set_num_threads({threads})
print(json.dumps(digest(run_all(123))))
"""


@pytest.mark.parametrize("threads", [1, 4])
def test_results_are_identical_run_to_run(threads):
    """A fresh process (its own allocations, thread pool and ISA dispatch) gets the digests of
    this one."""
    here = digest(run_all(123))
    code = _CHILD.format(tests=os.path.dirname(__file__), threads=threads)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert there == here, sorted(k for k in here if here[k] != there.get(k))
