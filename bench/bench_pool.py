"""Max pooling: mtlcore.ops.max_pool2d vs torch eager F.max_pool2d and torch.compile of it,
forward and forward+backward, NCHW and channels_last, same run, ratios.

Shapes: the two pooling layers of mtlcore.models.SmallCNN at batch 64 on 32x32 images
([64, 32, 32, 32] and [64, 64, 16, 16], 2x2 stride 2), an odd-sized map ([64, 64, 13, 13],
the second pool of the classic network with valid convolutions) and an overlapping 3x3
stride-2 pad-1 pool of a ResNet stem ([32, 64, 56, 56]). Bandwidth: (bytes of input read +
output written) for the forward, and (input + grad_output read + grad_input written) added for
the backward, over the time, as a share of a large copy's bytes per second measured in the
same run. The maps of the first three fit in this machine's L3 cache, so their bandwidth can
exceed the copy's.

    python bench/bench_pool.py [--device cuda] [--dtype bfloat16] [--quick] [--no-compile]

Results: bench/results/pool_<device>_<dtype>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import compare, copy_bandwidth, machine, print_table, write_results

import mtlcore
from mtlcore import ops

# name: (input shape, kernel, stride, padding)
CASES = {
    "SmallCNN pool 1": ((64, 32, 32, 32), 2, 2, 0),
    "SmallCNN pool 2": ((64, 64, 16, 16), 2, 2, 0),
    "odd 13x13 map": ((64, 64, 13, 13), 2, 2, 0),
    "ResNet stem 3x3/2": ((32, 64, 56, 56), 3, 2, 1),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def contenders(with_compile: bool) -> dict:
    fns = {"ours": ops.max_pool2d, "eager": F.max_pool2d}
    if with_compile:
        # One compiled graph per case (shape, layout, with and without grad): more than the
        # default limit of recompilations of one function.
        torch._dynamo.config.recompile_limit = 64
        fns["compiled"] = torch.compile(F.max_pool2d, fullgraph=True, dynamic=False)
    return fns


def bench_case(shape, k, s, p, fmt, args) -> dict[str, float]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    x.requires_grad_()
    out = F.max_pool2d(x.detach(), k, s, p)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    fns = contenders(not args.no_compile)
    for name, fn in fns.items():  # same values; compile (and warm) every contender
        torch.testing.assert_close(fn(x, k, s, p), out, msg=f"{name} differs")
        torch.autograd.grad(fn(x, k, s, p), x, grad)

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(x, k, s, p)

        return run

    def both(fn):
        return lambda: torch.autograd.grad(fn(x, k, s, p), x, grad)

    min_time = 0.2 if args.quick else 0.5
    fwd = compare({n: forward(f) for n, f in fns.items()}, args.rounds, min_time)
    fb = compare({n: both(f) for n, f in fns.items()}, args.rounds, min_time)
    size = x.element_size()
    fwd_bytes = (x.numel() + out.numel()) * size
    fb_bytes = fwd_bytes + (x.numel() + out.numel() + x.numel()) * size
    row = {
        "fwd_vs_eager": fwd["eager"] / fwd["ours"],
        "fwd_bwd_vs_eager": fb["eager"] / fb["ours"],
    }
    if "compiled" in fns:
        row["fwd_vs_compile"] = fwd["compiled"] / fwd["ours"]
        row["fwd_bwd_vs_compile"] = fb["compiled"] / fb["ours"]
    row.update(
        {
            "ours_fwd_ms": fwd["ours"] * 1e3,
            "ours_fwd_bwd_ms": fb["ours"] * 1e3,
            "eager_fwd_ms": fwd["eager"] * 1e3,
            "eager_fwd_bwd_ms": fb["eager"] * 1e3,
            "fwd_GBs": fwd_bytes / fwd["ours"] / 1e9,
            "fwd_bwd_GBs": fb_bytes / fb["ours"] / 1e9,
        }
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="shorter timing")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device, 1 << 24, args.rounds, 0.2 if args.quick else 0.5)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)

    rows = []
    for (case, (shape, k, s, p)), (layout, fmt) in (
        (c, lf) for c in CASES.items() for lf in LAYOUTS.items()
    ):
        row = {"case": case, "layout": layout, **bench_case(shape, k, s, p, fmt, args)}
        row["fwd_pct_of_bandwidth"] = 100 * row["fwd_GBs"] * 1e9 / bandwidth
        row["fwd_bwd_pct_of_bandwidth"] = 100 * row["fwd_bwd_GBs"] * 1e9 / bandwidth
        rows.append(row)
        print(
            f"  {case:18s} {layout:13s} fwd {row['fwd_vs_eager']:.2f}x eager, "
            f"fwd+bwd {row['fwd_bwd_vs_eager']:.2f}x eager",
            flush=True,
        )
    print_table(rows, list(rows[0]))
    path = write_results(
        f"pool_{device.type}_{args.dtype}",
        {
            "benchmark": "bench_pool",
            "machine": machine(device),
            "build": mtlcore.build_info(),
            "copy_bandwidth_GBs": bandwidth / 1e9,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
