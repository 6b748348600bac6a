"""The CPU output cache (csrc/cpu/output_cache.h): the ops' large CPU outputs take the memory of
dead ones of the same size. What it keeps must never show through in a result, its limit must
hold, and it must stay consistent when tensors die on other threads and after fork()."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

import mtlcore
from mtlcore import ops, reference

LIMIT = 256 << 20

pytestmark = pytest.mark.skipif(
    "address" in str(mtlcore.build_info()["sanitize"]),
    reason="the cache is off in AddressSanitizer builds",
)


@pytest.fixture(autouse=True)
def cache():
    """Each test starts with an empty cache at the default limit and leaves it so."""
    mtlcore.set_cpu_cache_limit(LIMIT)
    mtlcore.empty_cpu_cache()
    yield
    mtlcore.set_cpu_cache_limit(LIMIT)
    mtlcore.empty_cpu_cache()


def stats() -> dict[str, int]:
    return mtlcore.cpu_cache_stats()


def test_an_output_takes_the_memory_of_a_dead_one_of_its_size():
    x = torch.randn(8, 16, 32, 32)  # output 128 kB: cached
    a = ops.max_pool2d(x, 2)
    ptr, nbytes = a.data_ptr(), a.numel() * a.element_size()
    assert stats()["allocated_bytes"] >= nbytes
    del a
    s = stats()
    assert s["cached_blocks"] == 1 and s["cached_bytes"] >= nbytes
    b = ops.max_pool2d(x, 2)
    after = stats()
    assert b.data_ptr() == ptr
    assert after["hits"] == s["hits"] + 1 and after["cached_bytes"] == 0
    torch.testing.assert_close(b, reference.max_pool2d(x, 2), rtol=0, atol=0)
    small = ops.max_pool2d(torch.randn(1, 2, 8, 8), 2)  # 128 bytes: at::empty, not counted
    assert stats()["allocated_bytes"] == after["allocated_bytes"]
    del small


def poisoned_rerun(run):
    """Runs `run` once, fills every tensor it returned with NaN and frees them, so that the
    cache holds NaN blocks of exactly the sizes the second run asks for; returns both runs'
    results (the first as copies taken before the poisoning)."""
    first = run()
    copies = [t.clone() for t in first]
    hits = stats()["hits"]
    while first:
        first.pop().fill_(float("nan"))
    second = run()
    return copies, second, stats()["hits"] - hits


def conv_run(activation: str):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 8, 24, 24, generator=gen)  # output and input gradient above 64 kB
    w0 = torch.randn(16, 8, 3, 3, generator=gen)
    b0 = torch.randn(16, generator=gen)

    def run(op=ops.conv2d_act):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        out = op(x, w, b, padding=1, activation=activation)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return [out.detach(), *torch.autograd.grad(out, (x, w, b), g)]

    return run


def pool_run(**kw):
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 16, 49, 47, generator=gen)  # outputs above 64 kB: cached

    def run(op=ops.max_pool2d):
        x = x0.clone().requires_grad_()
        out = op(x, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        return [out.detach(), *torch.autograd.grad(out, x, g)]

    return run


def loss_run(retain_graph: bool):
    gen = torch.Generator().manual_seed(4)
    seg = torch.randn(2, 5, 64, 64, generator=gen)  # above 64 kB: cached
    labels = torch.randint(5, (2, 64, 64), generator=gen)
    labels[0, :7] = -100  # ignored positions: zero gradient
    depth = torch.randn(2, 1, 128, 128, generator=gen)
    depth_t = torch.randn(2, 1, 128, 128, generator=gen)
    depth_t[1, 0, :9] = float("nan")  # missing labels: zero gradient

    def run(op=ops.multitask_loss):
        logits = [seg.clone().requires_grad_(), depth.clone().requires_grad_()]
        total, per_task = op(logits, [labels, depth_t], ["ce", "mse"], torch.tensor([0.7, 1.3]))
        grads = torch.autograd.grad(total, logits, retain_graph=retain_graph)
        return [per_task.detach(), *grads]

    return run


@pytest.mark.parametrize(
    "name,make,ref",
    [
        ("conv relu", lambda: conv_run("relu"), reference.conv2d_act),
        ("conv gelu (saves the pre-activation)", lambda: conv_run("gelu"), reference.conv2d_act),
        ("pool 2x2", lambda: pool_run(kernel_size=2), reference.max_pool2d),
        (
            "pool 3x3 stride 2 padding 1 ceil",
            lambda: pool_run(kernel_size=3, stride=2, padding=1, ceil_mode=True),
            reference.max_pool2d,
        ),
        ("loss, graph freed (in-place scaling)", lambda: loss_run(False), reference.multitask_loss),
        ("loss, graph kept (new gradients)", lambda: loss_run(True), reference.multitask_loss),
    ],
)
def test_kept_memory_never_shows_in_results(name, make, ref):
    """A second run whose large outputs (the forward's and the input gradients) all come from
    NaN-filled kept blocks gives bitwise the first run's results, which match the reference."""
    run = make()
    first, second, hits = poisoned_rerun(run)
    assert hits >= 2, f"{name}: only {hits} outputs came from the cache"
    expected = run(op=ref)
    for a, b, e in zip(first, second, expected, strict=True):
        assert torch.equal(a, b), name
        torch.testing.assert_close(b, e, rtol=1e-4, atol=1e-4)


def test_limit_zero_turns_the_cache_off():
    mtlcore.set_cpu_cache_limit(0)
    x = torch.randn(8, 16, 32, 32)
    before = stats()
    for _ in range(3):
        ops.max_pool2d(x, 2)
    after = stats()
    assert after["limit_bytes"] == 0 and after["cached_bytes"] == 0
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]


def test_the_limit_holds_and_evicts_the_oldest_blocks():
    block = 8 * 16 * 16 * 16 * 4  # one pooled output, a whole number of pages
    mtlcore.set_cpu_cache_limit(2 * block)
    xs = [torch.randn(8, 16, 32, 32) for _ in range(4)]
    outs: list[torch.Tensor | None] = [ops.max_pool2d(x, 2) for x in xs]
    ptrs = [o.data_ptr() for o in outs]
    for i in range(4):  # freed in order: the first two are evicted
        outs[i] = None
    s = stats()
    assert s["cached_blocks"] == 2 and s["cached_bytes"] == 2 * block
    again = [ops.max_pool2d(x, 2) for x in xs[:2]]
    assert {o.data_ptr() for o in again} == set(ptrs[2:])
    mtlcore.set_cpu_cache_limit(0)  # lowering the limit frees what is kept above it
    del again
    assert stats()["cached_bytes"] == 0


def test_empty_cpu_cache_frees_what_is_kept_and_spares_live_tensors():
    x = torch.randn(8, 16, 32, 32)
    live = ops.max_pool2d(x, 2)
    dead = ops.max_pool2d(x, 2, 1)
    del dead
    assert stats()["cached_bytes"] > 0
    mtlcore.empty_cpu_cache()
    assert stats()["cached_bytes"] == 0 and stats()["cached_blocks"] == 0
    torch.testing.assert_close(live, reference.max_pool2d(x, 2), rtol=0, atol=0)


def test_outputs_dying_on_other_threads_keep_the_books_straight():
    """Tensors made on one thread and freed on eight others while the first keeps allocating:
    every byte is accounted for and the results stay right."""
    x = torch.randn(4, 16, 32, 32)
    expected = reference.max_pool2d(x, 2)
    base = stats()["allocated_bytes"]
    errors: list[BaseException] = []

    def free(batch):
        try:
            for t in batch:
                assert torch.equal(t, expected)
            batch.clear()
        except BaseException as e:
            errors.append(e)

    threads = []
    for _ in range(8):
        batch = [ops.max_pool2d(x, 2) for _ in range(20)]
        threads.append(threading.Thread(target=free, args=(batch,)))
        threads[-1].start()
        del batch
        torch.testing.assert_close(ops.max_pool2d(x, 2), expected, rtol=0, atol=0)
    for t in threads:
        t.join()
    assert not errors, errors
    assert stats()["allocated_bytes"] == base


def _child_pools(queue) -> None:
    torch.set_num_threads(1)  # OpenMP's thread pool does not survive fork()
    x = torch.randn(8, 16, 32, 32)
    out = ops.max_pool2d(x, 2)
    queue.put(bool(torch.equal(out, reference.max_pool2d(x, 2))))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_allocates_and_frees_outputs():
    x = torch.randn(8, 16, 32, 32)
    kept = ops.max_pool2d(x, 2)
    del kept  # the parent keeps a block when it forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_pools, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5)


@pytest.mark.parametrize(
    "value,ok", [("0", True), ("64", True), ("lots", False), ("-1", False), ("9" * 20, False)]
)
def test_the_environment_variable_sets_the_limit(value, ok):
    script = (
        "import torch, mtlcore\n"
        "from mtlcore import ops\n"
        "try:\n"
        "    ops.max_pool2d(torch.randn(8, 16, 32, 32), 2)\n"
        "    print(mtlcore.cpu_cache_stats()['limit_bytes'])\n"
        "except ValueError as e:\n"
        "    print('error', e)\n"
    )
    env = {**os.environ, "MTLCORE_CPU_CACHE_MB": value}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    if ok:
        assert last == str(int(value) << 20)
    else:
        assert last.startswith("error") and "MTLCORE_CPU_CACHE_MB" in last


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_set_cpu_cache_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="nbytes"):
        mtlcore.set_cpu_cache_limit(bad)
