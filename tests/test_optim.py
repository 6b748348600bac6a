"""Fused optimizer updates: the ops against mtlcore.reference, the optimizers against torch.optim,
state_dict compatibility, GradScaler, opcheck, torch.compile and bad input."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from conftest import assert_device_side_assertion, dtypes_for

import mtlcore
from mtlcore import ops, optim, reference

# Sizes that are not multiples of any chunk or vector width; () is a 0-d tensor, (0,) empty.
SHAPES = [(1,), (7,), (1000003,), (), (0,), (33, 17)]
SMALL_SHAPES = [(1,), (7,), (257,), (), (33, 17)]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-12, atol=1e-14),
        torch.float32: dict(rtol=1e-6, atol=1e-7),
        torch.float16: dict(rtol=2e-3, atol=1e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    }[dtype]


def rand_list(shapes, dtype, device, gen, positive=False):
    out = []
    for s in shapes:
        t = (
            torch.rand(s, generator=gen, dtype=torch.float64)
            if positive
            else torch.randn(s, generator=gen, dtype=torch.float64)
        )
        out.append(t.to(device=device, dtype=dtype))
    return out


def clone_list(ts, dtype=None):
    return [t.clone() if dtype is None else t.to(dtype) for t in ts]


def assert_lists_close(actual, expected, dtype):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e.to(a.dtype), **tol(dtype), msg=lambda m, i=i: f"[{i}] {m}")


SGD_CONFIGS = [
    dict(),
    dict(weight_decay=0.01),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, maximize=True),
    dict(momentum=0.9, is_first_step=True, weight_decay=0.1),
]

ADAM_CONFIGS = [
    dict(),
    dict(weight_decay=0.01),
    dict(weight_decay=0.1, decoupled_weight_decay=True),
    dict(amsgrad=True),
    dict(amsgrad=True, weight_decay=1e-2, maximize=True),
    dict(maximize=True, decoupled_weight_decay=True, weight_decay=1e-3),
]


# ------------------------------------------------------------------------------------------
# The ops against mtlcore.reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "gradscale"])
def test_sgd_op_matches_reference(device, config, scaled):
    gen = torch.Generator().manual_seed(1)
    for dtype in dtypes_for(device):
        params = rand_list(SHAPES, dtype, device, gen)
        grads = rand_list(SHAPES, dtype, device, gen)
        bufs = rand_list(SHAPES, dtype, device, gen) if config.get("momentum") else []
        grad_scale = torch.tensor(3072.0, device=device) if scaled else None
        # The reference runs in float64 for the reduced-precision dtypes.
        ref_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else None
        ep, eg, eb = (
            clone_list(params, ref_dtype),
            clone_list(grads, ref_dtype),
            clone_list(bufs, ref_dtype),
        )
        ops.sgd_(params, grads, bufs, lr=0.1, grad_scale=grad_scale, **config)
        reference.sgd_(ep, eg, eb, lr=0.1, grad_scale=grad_scale, **config)
        assert_lists_close(params, ep, dtype)
        assert_lists_close(grads, eg, dtype)
        assert_lists_close(bufs, eb, dtype)


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "gradscale"])
def test_adam_op_matches_reference(device, config, scaled):
    gen = torch.Generator().manual_seed(2)
    for dtype in dtypes_for(device):
        params = rand_list(SHAPES, dtype, device, gen)
        grads = rand_list(SHAPES, dtype, device, gen)
        exp_avgs = rand_list(SHAPES, dtype, device, gen)
        exp_avg_sqs = rand_list(SHAPES, dtype, device, gen, positive=True)
        maxs = rand_list(SHAPES, dtype, device, gen, positive=True) if config.get("amsgrad") else []
        # Every parameter at its own step count.
        steps = [torch.tensor(float(s), device=device) for s in (1, 2, 5, 40, 7, 1000)]
        grad_scale = torch.tensor(4096.0, device=device) if scaled else None
        ref_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else None
        expected = [
            clone_list(ts, ref_dtype) for ts in (params, grads, exp_avgs, exp_avg_sqs, maxs)
        ]
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, grad_scale=grad_scale, **config)
        ops.adam_(params, grads, exp_avgs, exp_avg_sqs, maxs, steps, **kw)
        reference.adam_(*expected, steps, **kw)
        for actual, exp in zip((params, grads, exp_avgs, exp_avg_sqs, maxs), expected, strict=True):
            assert_lists_close(actual, exp, dtype)


def test_found_inf_skips_everything(device):
    gen = torch.Generator().manual_seed(3)
    params = rand_list(SMALL_SHAPES, torch.float32, device, gen)
    grads = rand_list(SMALL_SHAPES, torch.float32, device, gen)
    states = [rand_list(SMALL_SHAPES, torch.float32, device, gen, positive=True) for _ in range(3)]
    before = [clone_list(ts) for ts in (params, grads, *states)]
    found_inf = torch.ones((), device=device)
    scale = torch.tensor(8.0, device=device)
    steps = [torch.tensor(3.0, device=device) for _ in SMALL_SHAPES]
    ops.sgd_(params, grads, states[0], lr=0.1, momentum=0.9, grad_scale=scale, found_inf=found_inf)
    ops.adam_(
        params,
        grads,
        *states,
        steps,
        lr=0.1,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        amsgrad=True,
        grad_scale=scale,
        found_inf=found_inf,
    )
    for now, then in zip((params, grads, *states), before, strict=True):
        for a, b in zip(now, then, strict=True):
            assert torch.equal(a, b)
    # found_inf == 0 updates.
    ops.sgd_(params, grads, [], lr=0.1, found_inf=torch.zeros((), device=device))
    assert not torch.equal(params[2], before[0][2])


def test_non_dense_and_mixed_layouts(device):
    """Sliced, transposed and channels_last tensors are updated in place like contiguous ones."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(40, 30, generator=gen).to(device)
    sliced = base[::2, 1::3]  # non-dense view: the update must land in `base`
    transposed = torch.randn(30, 20, generator=gen).to(device).t()
    cl = (
        torch.randn(2, 3, 5, 4, generator=gen)
        .to(device)
        .contiguous(memory_format=torch.channels_last)
    )
    params = [sliced, transposed, cl]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]  # contiguous grads
    bufs = [
        torch.randn(p.shape, generator=gen).to(device).t().contiguous().t()
        if p.dim() == 2
        else torch.randn(p.shape, generator=gen).to(device)
        for p in params
    ]
    expected = [clone_list(ts) for ts in (params, grads, bufs)]
    base_before = base.clone()
    ops.sgd_(params, grads, bufs, lr=0.3, momentum=0.9, weight_decay=0.1)
    reference.sgd_(*expected, lr=0.3, momentum=0.9, weight_decay=0.1)
    assert_lists_close(params, expected[0], torch.float32)
    assert_lists_close(bufs, expected[2], torch.float32)
    # Only the sliced elements of `base` changed.
    mask = torch.zeros_like(base, dtype=torch.bool)
    mask[::2, 1::3] = True
    assert torch.equal(base[~mask], base_before[~mask])
    assert not torch.equal(base[mask], base_before[mask])


def test_cpu_results_do_not_depend_on_threads():
    gen = torch.Generator().manual_seed(5)
    params = rand_list(SHAPES, torch.float32, "cpu", gen)
    grads = rand_list(SHAPES, torch.float32, "cpu", gen)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, m, v = (
                clone_list(params),
                [torch.zeros_like(t) for t in params],
                [torch.zeros_like(t) for t in params],
            )
            steps = [torch.tensor(1.0) for _ in params]
            ops.adam_(
                p, clone_list(grads), m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8
            )
            results.append(p)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# The optimizers against torch.optim, over 100 steps
# ------------------------------------------------------------------------------------------


def make_params(device, dtype, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        params.append(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype))
    # A non-contiguous (non-dense) parameter too: a leaf view with gaps.
    wide = torch.randn(12, 10, generator=gen, dtype=torch.float64).to(device, dtype)
    params.append(wide[:, ::3].detach())
    return [p.requires_grad_() for p in params]


def run_steps(opt, params, steps, seed, skip_grad_of=None):
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            p.grad = None if (skip_grad_of == i and k % 3 == 0) else g
        opt.step()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-30)


OPTIM_CASES = [
    ("SGD", dict(lr=0.01)),
    ("SGD", dict(lr=0.01, momentum=0.9, weight_decay=1e-2)),
    ("SGD", dict(lr=0.01, momentum=0.9, dampening=0.2, maximize=True)),
    ("SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("Adam", dict(lr=1e-3)),
    ("Adam", dict(lr=1e-3, weight_decay=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-3, betas=(0.8, 0.99), maximize=True)),
    ("AdamW", dict(lr=1e-3)),
    ("AdamW", dict(lr=1e-3, weight_decay=0.1, amsgrad=True)),
]


@pytest.mark.parametrize(("name", "kwargs"), OPTIM_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_optimizer_matches_torch_over_100_steps(device, name, kwargs, dtype):
    ours_params = make_params(device, dtype)
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = getattr(optim, name)(ours_params, **kwargs)
    theirs = getattr(torch.optim, name)(torch_params, **kwargs)
    # Parameter 1 gets no gradient every third step: it must be skipped, as torch does.
    run_steps(ours, ours_params, 100, seed=7, skip_grad_of=1)
    run_steps(theirs, torch_params, 100, seed=7, skip_grad_of=1)
    limit = 1e-6 if dtype == torch.float32 else 1e-12
    for i, (a, b) in enumerate(zip(ours_params, torch_params, strict=True)):
        assert max_rel_diff(a.detach(), b.detach()) <= limit, f"param {i}"
    # Same state layout and values.
    for a, b in zip(ours_params, torch_params, strict=True):
        sa, sb = ours.state[a], theirs.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert (
                max_rel_diff(sa[key].detach().cpu().double(), sb[key].detach().cpu().double())
                <= limit * 10
            )


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_state_dict_round_trips_with_torch(device, name):
    kwargs = dict(lr=0.01, momentum=0.9) if name == "SGD" else dict(lr=1e-3, amsgrad=True)
    for src_cls, dst_cls in (
        (getattr(torch.optim, name), getattr(optim, name)),
        (getattr(optim, name), getattr(torch.optim, name)),
    ):
        p_src = make_params(device, torch.float32, SMALL_SHAPES)
        src = src_cls(p_src, **kwargs)
        run_steps(src, p_src, 5, seed=11)
        p_dst = [p.detach().clone().requires_grad_() for p in p_src]
        dst = dst_cls(p_dst, **kwargs)
        dst.load_state_dict(copy.deepcopy(src.state_dict()))  # as through torch.save/load
        assert dst.state_dict()["param_groups"] == src.state_dict()["param_groups"]
        run_steps(src, p_src, 5, seed=12)
        run_steps(dst, p_dst, 5, seed=12)
        for a, b in zip(p_src, p_dst, strict=True):
            assert max_rel_diff(a.detach(), b.detach()) <= 1e-6


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grad_scaler_with_an_inf_step(device, name):
    """GradScaler hands grad_scale/found_inf to our optimizers (no unscale pass); a step with an
    inf gradient is skipped and the scale backs off, exactly as with torch's optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(
        device
    )
    twin = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).to(
        device
    )
    twin.load_state_dict(model.state_dict())
    kwargs = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    ours = getattr(optim, name)(model.parameters(), **kwargs)
    theirs = getattr(torch.optim, name)(twin.parameters(), **kwargs)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        x = torch.randn(32, 6, generator=gen).to(device)
        y = torch.randn(32, 3, generator=gen).to(device)
        for net, opt, scaler in ((model, ours, scalers[0]), (twin, theirs, scalers[1])):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            scaler.scale(loss).backward()
            if step == 3:
                net[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert max_rel_diff(a.detach(), b.detach()) <= 1e-6
    if name == "Adam":
        assert all(s["step"].item() == 7 for s in ours.state.values())


def test_optimizer_rejects_sparse_grads_and_unsupported_flags():
    p = torch.zeros(4, 3, requires_grad=True)
    p.grad = torch.eye(4, 3).to_sparse()
    for name in ("SGD", "Adam", "AdamW"):
        with pytest.raises(RuntimeError, match="sparse"):
            getattr(optim, name)([p], lr=0.1).step()
    with pytest.raises(ValueError, match="capturable"):
        optim.Adam([p], capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        optim.SGD([p], lr=0.1, differentiable=True)


def test_closure_and_param_groups():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = a.sum() + b.sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert torch.allclose(a, torch.full((3,), 0.9))
    assert torch.allclose(b, torch.full((2,), 0.5, dtype=torch.float64))


# ------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ------------------------------------------------------------------------------------------


def sgd_sample(device, scaled):
    gen = torch.Generator().manual_seed(9)
    args = [rand_list(SMALL_SHAPES, torch.float32, device, gen) for _ in range(3)]
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    if scaled:
        kwargs.update(
            grad_scale=torch.tensor(2.0, device=device), found_inf=torch.zeros((), device=device)
        )
    return args, kwargs


def adam_sample(device, amsgrad):
    gen = torch.Generator().manual_seed(10)
    args = [rand_list(SMALL_SHAPES, torch.float32, device, gen, positive=i == 3) for i in range(4)]
    args.append(
        rand_list(SMALL_SHAPES, torch.float32, device, gen, positive=True) if amsgrad else []
    )
    args.append([torch.tensor(float(i + 1), device=device) for i in range(len(SMALL_SHAPES))])
    return args, dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=amsgrad, weight_decay=0.1)


@pytest.mark.parametrize("flag", [False, True])
def test_opcheck(device, flag):
    args, kwargs = sgd_sample(device, flag)
    torch.library.opcheck(torch.ops.mtlcore.sgd_.default, args, kwargs)
    args, kwargs = adam_sample(device, flag)
    torch.library.opcheck(torch.ops.mtlcore.adam_.default, args, kwargs)


def test_compile_fullgraph(device):
    def sgd_step(params, grads, bufs):
        ops.sgd_(params, grads, bufs, lr=0.1, momentum=0.9, weight_decay=0.01)
        return params[0].sum()

    def adam_step(params, grads, m, v, steps):
        ops.adam_(params, grads, m, v, [], steps, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        return params[0].sum()

    compiled_sgd = torch.compile(sgd_step, fullgraph=True, backend="aot_eager")
    compiled_adam = torch.compile(adam_step, fullgraph=True, backend="aot_eager")
    args, _ = sgd_sample(device, False)
    eager_args = [clone_list(a) for a in args]
    compiled_sgd(*args)
    sgd_step(*eager_args)
    for a, b in zip(args, eager_args, strict=True):
        assert_lists_close(a, b, torch.float32)
    args, _ = adam_sample(device, False)
    args = [args[0], args[1], args[2], args[3], args[5]]
    eager_args = [clone_list(a) for a in args]
    compiled_adam(*args)
    adam_step(*eager_args)
    for a, b in zip(args, eager_args, strict=True):
        assert_lists_close(a, b, torch.float32)


# ------------------------------------------------------------------------------------------
# Bad input: a clear exception that names the argument
# ------------------------------------------------------------------------------------------


def _sgd_call(device, **overrides):
    p = [torch.zeros(4, device=device), torch.zeros(3, device=device)]
    g = [torch.ones(4, device=device), torch.ones(3, device=device)]
    b = [torch.zeros(4, device=device), torch.zeros(3, device=device)]
    kwargs = dict(lr=0.1, momentum=0.9)
    args = dict(params=p, grads=g, momentum_buffers=b)
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    ops.sgd_(args["params"], args["grads"], args["momentum_buffers"], **kwargs)


SGD_BAD = [
    ("grads", dict(grads=lambda a: a["grads"][:1])),
    ("momentum_buffers", dict(momentum_buffers=lambda a: a["momentum_buffers"][:1])),
    ("grads\\[1\\] has dtype", dict(grads=lambda a: [a["grads"][0], a["grads"][1].double()])),
    ("grads\\[0\\] has shape", dict(grads=lambda a: [a["grads"][0][:2], a["grads"][1]])),
    ("params\\[1\\] has dtype", dict(params=lambda a: [a["params"][0], a["params"][1].long()])),
    ("lr", dict(lr=-0.1)),
    ("lr", dict(lr=float("nan"))),
    ("momentum", dict(momentum=-1.0)),
    ("weight_decay", dict(weight_decay=float("inf"))),
    ("nesterov", dict(nesterov=True, dampening=0.5)),
    ("grad_scale", dict(grad_scale=torch.ones(2))),
    ("grad_scale", dict(grad_scale=torch.ones((), dtype=torch.float64))),
    ("found_inf", dict(found_inf=torch.ones(3))),
    ("share memory", dict(grads=lambda a: [a["params"][0], a["grads"][1]])),
    ("share memory", dict(momentum_buffers=lambda a: [a["grads"][0], a["momentum_buffers"][1]])),
    ("expanded", dict(params=lambda a: [torch.zeros(1).expand(4), a["params"][1]])),
]


@pytest.mark.parametrize(("match", "overrides"), SGD_BAD, ids=[m for m, _ in SGD_BAD])
def test_sgd_bad_input(match, overrides):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        _sgd_call("cpu", **overrides)


def _adam_call(**overrides):
    args = dict(
        params=[torch.zeros(4), torch.zeros(3)],
        grads=[torch.ones(4), torch.ones(3)],
        exp_avgs=[torch.zeros(4), torch.zeros(3)],
        exp_avg_sqs=[torch.zeros(4), torch.zeros(3)],
        max_exp_avg_sqs=[],
        state_steps=[torch.tensor(1.0), torch.tensor(1.0)],
    )
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    for k, v in overrides.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    ops.adam_(*args.values(), **kwargs)


ADAM_BAD = [
    ("exp_avgs has 1", dict(exp_avgs=lambda a: a["exp_avgs"][:1])),
    ("max_exp_avg_sqs", dict(amsgrad=True)),
    ("state_steps has 1", dict(state_steps=lambda a: a["state_steps"][:1])),
    (
        "state_steps\\[0\\] must be a one-element",
        dict(state_steps=lambda a: [torch.ones(2), a["state_steps"][1]]),
    ),
    (
        "state_steps\\[1\\] must be float",
        dict(state_steps=lambda a: [a["state_steps"][0], torch.tensor(1)]),
    ),
    (
        "state_steps\\[0\\] must be >= 1",
        dict(state_steps=lambda a: [torch.tensor(0.0), a["state_steps"][1]]),
    ),
    (
        "exp_avg_sqs\\[1\\] has shape",
        dict(exp_avg_sqs=lambda a: [a["exp_avg_sqs"][0], torch.zeros(3, 1)]),
    ),
    ("beta1", dict(beta1=1.0)),
    ("beta2", dict(beta2=-0.1)),
    ("eps", dict(eps=-1e-8)),
    ("lr", dict(lr=float("inf"))),
    ("weight_decay", dict(weight_decay=-1.0)),
    ("share memory", dict(exp_avgs=lambda a: [a["exp_avg_sqs"][0], a["exp_avgs"][1]])),
]


@pytest.mark.parametrize(("match", "overrides"), ADAM_BAD, ids=[m for m, _ in ADAM_BAD])
def test_adam_bad_input(match, overrides):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        _adam_call(**overrides)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_device_mismatch():
    with pytest.raises((RuntimeError, ValueError), match="grads\\[1\\] is on"):
        _sgd_call("cuda", grads=lambda a: [a["grads"][0], a["grads"][1].cpu()])
    with pytest.raises((RuntimeError, ValueError), match="grad_scale is on"):
        _sgd_call("cuda", grad_scale=torch.ones(()))
    with pytest.raises((RuntimeError, ValueError), match="state_steps\\[0\\] is on"):
        p = [torch.zeros(3, device="cuda")]
        ops.adam_(
            p,
            [torch.ones(3, device="cuda")],
            [torch.zeros(3, device="cuda")],
            [torch.zeros(3, device="cuda")],
            [],
            [torch.tensor(1.0)],
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )


def test_empty_lists_are_a_no_op():
    ops.sgd_([], [], [], lr=0.1)
    ops.adam_([], [], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)


def test_every_isa_path_gives_the_same_bits(tmp_path):
    """The base, AVX2 and AVX-512 builds of the loops agree bitwise (those this CPU runs)."""
    import subprocess
    import sys

    script = (
        "import sys, torch, mtlcore\n"
        "from mtlcore import ops\n"
        "g = torch.Generator().manual_seed(0)\n"
        "p = [torch.randn(s, generator=g) for s in [(1,), (7,), (100003,), ()]]\n"
        "gr = [torch.randn(t.shape, generator=g) for t in p]\n"
        "m = [torch.randn(t.shape, generator=g) for t in p]\n"
        "v = [torch.rand(t.shape, generator=g) for t in p]\n"
        "st = [torch.tensor(3.0) for _ in p]\n"
        "kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)\n"
        "ops.adam_(p, gr, m, v, [], st, **kw)\n"
        "ops.sgd_(p, gr, m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)\n"
        "torch.save([mtlcore.build_info()['cpu_isa'], p, m, v], sys.argv[1])\n"
    )
    outputs = {}
    for isa in ("base", "avx2", "avx512"):
        out = tmp_path / f"{isa}.pt"
        env = {**__import__("os").environ, "MTLCORE_CPU_ISA": isa}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env)
        used, *tensors = torch.load(out)
        outputs[used] = tensors
    assert "base" in outputs
    ref = outputs["base"]
    for isa, tensors in outputs.items():
        for a, b in zip(itertools.chain(*tensors), itertools.chain(*ref), strict=True):
            assert torch.equal(a, b), isa


def test_runs_against_installed_package():
    """The tests exercise the installed package, not the source tree."""
    source = Path(__file__).resolve().parents[1] / "python"
    assert source not in Path(mtlcore.__file__).resolve().parents


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_step_hooks_and_profiler_range(name):
    """Step hooks run as with torch.optim (a pre hook may replace the arguments), and the
    profiler sees the Optimizer.step range."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    p = torch.ones(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = getattr(optim, name)([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    handle = register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global"))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {e.name for e in prof.events()}
    assert f"Optimizer.step#{name}.step" in names
    assert any("mtlcore::" in n for n in names)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_low_precision_params_match_torch_fused_on_cuda(name, dtype):
    """fp16/bf16 parameters (math in fp32 inside the kernel) against torch's fused CUDA
    optimizer over 20 steps: the same arithmetic, so agreement within a few low-precision ulps."""
    kwargs = dict(lr=0.01, momentum=0.9, weight_decay=1e-3) if name == "SGD" else dict(lr=1e-3)
    # Dense parameters only: torch's fused path is the reference here.
    ours_params = make_params("cuda", dtype, shapes=[(1,), (7,), (1000003,), (), (33, 17)])[:-1]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = getattr(optim, name)(ours_params, **kwargs)
    theirs = getattr(torch.optim, name)(torch_params, fused=True, **kwargs)
    run_steps(ours, ours_params, 20, seed=3)
    run_steps(theirs, torch_params, 20, seed=3)
    for a, b in zip(ours_params, torch_params, strict=True):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **tol(dtype))


def test_adam_step_below_one_raises_before_any_update():
    """state_steps must be >= 1 (bias_correction1 = 1 - beta1^0 would divide by zero): the CPU
    op raises, naming the counter, and leaves every tensor as it was."""
    params = [torch.randn(5), torch.randn(3, 2)]
    grads = [torch.randn_like(p) for p in params]
    state = [torch.zeros_like(p) for p in params for _ in range(2)]
    before = [t.clone() for t in params + state]
    steps = [torch.tensor(2.0), torch.tensor(0.0)]
    with pytest.raises(ValueError, match=r"state_steps\[1\] must be >= 1"):
        ops.adam_(
            params,
            grads,
            state[0::2],
            state[1::2],
            [],
            steps,
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )
    for a, b in zip(params + state, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_adam_step_below_one_is_a_device_side_error():
    """On CUDA the step counters stay on the device (no synchronisation): a step of 0 trips a
    device-side assertion, reported at the next synchronisation, instead of writing inf/NaN
    parameters."""
    assert_device_side_assertion(
        "import torch\n"
        "from mtlcore import ops\n"
        "p = [torch.randn(1000, device='cuda')]\n"
        "z = [torch.zeros(1000, device='cuda')]\n"
        "ops.adam_(p, [torch.randn_like(p[0])], z, [torch.zeros_like(z[0])], [],\n"
        "          [torch.tensor(0.0, device='cuda')], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)\n"
        "torch.cuda.synchronize()\n"
    )
