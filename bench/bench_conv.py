"""Fused conv2d + activation: mtlcore.ops.conv2d_act vs torch eager act(F.conv2d(...)) and vs
torch.compile of it, forward and forward+backward, same run, ratios.

Shapes (N, C, H=W, K, 3x3 kernel): the classic small CNN at batch 64, (64, 3, 32, 32, valid)
and (64, 32, 15, 64, valid), plus (128, 64, 16, 128, pad 1) and (32, 128, 32, 128, pad 1).
Forward+backward computes the weight and bias gradients and, except for the first layer
(whose input is the image), the input gradient, as training does. The practical peak is the
best of three large matmuls measured in the same run; "% of peak" is the op's GFLOP/s (2 N K C
R S OH OW flops per pass, three passes for forward+backward with the input gradient, two
without) over it. Peak memory of forward+backward is measured in a fresh process per
contender (CPU: growth of the resident set's high-water mark, reset before the step; CUDA:
torch.cuda.max_memory_allocated).

    python bench/bench_conv.py [--device cuda] [--dtype float16] [--quick] [--no-compile]

Results: bench/results/conv_<device>_<dtype>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import compare, machine, print_table, write_results

import mtlcore
from mtlcore import ops, reference

SHAPES = {
    "small_cnn_conv1": (64, 3, 32, 32, 0),
    "small_cnn_conv2": (64, 32, 15, 64, 0),
    "128x64x16_k128": (128, 64, 16, 128, 1),
    "32x128x32_k128": (32, 128, 32, 128, 1),
}


def make(shape, device, dtype, seed=0):
    n, c, h, k, pad = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=gen).to(device, dtype)
    w = (torch.randn(k, c, 3, 3, generator=gen) / (9 * c) ** 0.5).to(device, dtype)
    b = torch.randn(k, generator=gen).to(device, dtype)
    return x, w, b, pad


def output_shape(shape) -> tuple[int, int, int, int]:
    n, _, h, k, pad = shape
    return n, k, h + 2 * pad - 2, h + 2 * pad - 2


def flops(shape) -> float:
    n, c, h, k, pad = shape
    oh = h + 2 * pad - 2
    return 2.0 * n * k * c * 9 * oh * oh


def contenders(activation: str, with_compile: bool):
    def ours(x, w, b, pad):
        return ops.conv2d_act(x, w, b, 1, pad, activation=activation)

    def eager(x, w, b, pad):
        return reference.apply_activation(F.conv2d(x, w, b, 1, pad), activation)

    out = {"ours": ours, "eager": eager}
    if with_compile:
        out["compiled"] = torch.compile(eager, dynamic=False)
    return out


def training_step(fn, x, w, b, pad, grad, input_grad: bool):
    xs = x.requires_grad_(input_grad)
    ws, bs = w.requires_grad_(), b.requires_grad_()
    out = fn(xs, ws, bs, pad)
    inputs = (xs, ws, bs) if input_grad else (ws, bs)
    return torch.autograd.grad(out, inputs, grad)


def peak_memory(name: str, shape, device: str, dtype: str, activation: str) -> float:
    """Extra peak memory (bytes) of one forward+backward, measured in a fresh process."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bench_conv as b
x, w, bias, pad = b.make({shape!r}, {device!r}, getattr(torch, {dtype!r}))
fn = b.contenders({activation!r}, False)[{name!r}]
grad = torch.randn(b.output_shape({shape!r}), device={device!r}, dtype=x.dtype)
input_grad = {shape[1] != 3}
def status(field):  # kB values of /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
if {device!r} == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set size
        f.write("5")
    base = status("VmRSS")
grads = b.training_step(fn, x, w, bias, pad, grad, input_grad)
if {device!r} == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
else:
    peak = status("VmHWM")
print(json.dumps(peak - base))
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    return float(json.loads(run.stdout.strip().splitlines()[-1]))


def matmul_peak(device, dtype, rounds: int, min_time: float) -> float:
    """The best FLOP/s of square matmuls (torch's BLAS) of a few sizes: the practical peak."""
    best = 0.0
    for size in (1024, 2048, 3072):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = compare({"mm": lambda a=a, b=b: a @ b}, rounds, min_time)["mm"]
        best = max(best, 2.0 * size**3 / t)
    return best


def bench_shape(shape, args, peak: float) -> dict[str, float]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    min_time = 0.2 if args.quick else 0.5
    x, w, b, pad = make(shape, device, dtype)
    fns = contenders(args.activation, not args.no_compile)
    input_grad = shape[1] != 3
    grad = torch.randn(output_shape(shape), device=device, dtype=dtype)

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(x, w, b, pad)

        return run

    def train(fn):
        return lambda: training_step(fn, x, w, b, pad, grad, input_grad)

    fwd = compare({k: forward(f) for k, f in fns.items()}, args.rounds, min_time)
    both = compare({k: train(f) for k, f in fns.items()}, args.rounds, min_time)
    passes = 3 if input_grad else 2
    row = {
        "fwd_vs_eager": fwd["eager"] / fwd["ours"],
        "fwd_bwd_vs_eager": both["eager"] / both["ours"],
    }
    if "compiled" in fns:
        row["fwd_vs_compile"] = fwd["compiled"] / fwd["ours"]
        row["fwd_bwd_vs_compile"] = both["compiled"] / both["ours"]
    row.update(
        {
            "ours_fwd_ms": fwd["ours"] * 1e3,
            "ours_fwd_bwd_ms": both["ours"] * 1e3,
            "eager_fwd_ms": fwd["eager"] * 1e3,
            "eager_fwd_bwd_ms": both["eager"] * 1e3,
            "ours_fwd_GFLOPs": flops(shape) / fwd["ours"] / 1e9,
            "fwd_pct_of_peak": 100 * flops(shape) / fwd["ours"] / peak,
            "fwd_bwd_pct_of_peak": 100 * passes * flops(shape) / both["ours"] / peak,
            "eager_fwd_pct_of_peak": 100 * flops(shape) / fwd["eager"] / peak,
        }
    )
    for name in ("ours", "eager"):
        mem = peak_memory(name, shape, args.device, args.dtype, args.activation)
        row[f"peak_mem_{name}_MB"] = mem / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--activation", default="relu", choices=ops.ACTIVATIONS)
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    min_time = 0.2 if args.quick else 0.5
    peak = matmul_peak(device, dtype, args.rounds, min_time)
    print(f"matmul practical peak: {peak / 1e9:.1f} GFLOP/s", flush=True)

    rows = []
    for case, shape in SHAPES.items():
        rows.append({"case": case, **bench_shape(shape, args, peak)})
        print(
            f"  {case:16s} fwd {rows[-1]['fwd_vs_eager']:.2f}x eager, "
            f"fwd+bwd {rows[-1]['fwd_bwd_vs_eager']:.2f}x eager",
            flush=True,
        )
    print_table(rows, list(rows[0]))
    path = write_results(
        f"conv_{device.type}_{args.dtype}",
        {
            "benchmark": "bench_conv",
            "activation": args.activation,
            "machine": machine(device),
            "build": mtlcore.build_info(),
            "matmul_peak_GFLOPs": peak / 1e9,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
