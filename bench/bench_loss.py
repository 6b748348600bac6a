"""Fused multi-task loss: mtlcore.ops.multitask_loss vs the eager PyTorch composition of the
per-task functional losses and the coupling formula, and vs torch.compile of it; forward and
forward+backward (gradients of total with respect to every task's logits), same run, ratios.

Cases:
  classification  3 ce heads (10, 100, 2 classes) + bce (40 outputs) + mse (4 outputs),
                  batch 256, task weights and a 5x5 relation matrix;
  dense           ce segmentation [8, 13, 128, 128] + depth mse [8, 1, 128, 128] + normals l1
                  [8, 3, 128, 128], task weights. Bandwidth: (bytes of logits read + bytes of
                  gradients written) / forward+backward time, over a large copy's bytes per
                  second measured in the same run (memory), and over those of a copy of the
                  logits' size (whose 2 x 8.5 MB, like the loss's, may stay in a large cache).
Memory kept for backward: the bytes autograd saves between forward and backward (counted with
saved_tensors_hooks), ours and eager's, next to the bytes of the logits.

    python bench/bench_loss.py [--device cuda] [--dtype bfloat16] [--quick] [--no-compile]

Results: bench/results/loss_<device>_<dtype>.json (or under $OUT).
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

CASES = {
    "classification": {
        "heads": [
            ("ce", (256, 10)),
            ("ce", (256, 100)),
            ("ce", (256, 2)),
            ("bce", (256, 40)),
            ("mse", (256, 4)),
        ],
        "relation": True,
    },
    "dense": {
        "heads": [("ce", (8, 13, 128, 128)), ("mse", (8, 1, 128, 128)), ("l1", (8, 3, 128, 128))],
        "relation": False,
    },
}


def make(case: dict, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits, targets, kinds = [], [], []
    for kind, shape in case["heads"]:
        logits.append(torch.randn(shape, generator=gen).to(device, dtype))
        if kind == "ce":
            label_shape = (shape[0], *shape[2:])
            targets.append(torch.randint(shape[1], label_shape, generator=gen).to(device))
        elif kind == "bce":
            targets.append(torch.rand(shape, generator=gen).to(device, dtype))
        else:
            targets.append(torch.randn(shape, generator=gen).to(device, dtype))
        kinds.append(kind)
    t = len(kinds)
    weights = torch.rand(t, generator=gen).to(device)
    relation = (0.1 * torch.randn(t, t, generator=gen)).to(device) if case["relation"] else None
    return logits, targets, kinds, weights, relation


def eager(logits, targets, kinds, weights, relation):
    """What a user writes with torch.nn.functional: one loss per head, then the coupling."""
    fns = {
        "ce": F.cross_entropy,
        "bce": F.binary_cross_entropy_with_logits,
        "mse": F.mse_loss,
        "l1": F.l1_loss,
    }
    per_task = torch.stack(
        [fns[k](x, y).float() for x, y, k in zip(logits, targets, kinds, strict=True)]
    )
    total = (weights * per_task).sum()
    if relation is not None:
        total = total + (relation * torch.outer(per_task, per_task)).sum()
    return total, per_task


def fused(logits, targets, kinds, weights, relation):
    return ops.multitask_loss(logits, targets, kinds, weights, relation)


def saved_bytes(fn, logits, targets, kinds, weights, relation) -> int:
    """Bytes autograd keeps for backward in one forward of fn."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    leaves = [x.detach().requires_grad_() for x in logits]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(leaves, targets, kinds, weights, relation)
    return total


def bench_case(name: str, args, bandwidth: float) -> dict[str, float]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    min_time = 0.2 if args.quick else 0.5
    logits, targets, kinds, weights, relation = make(CASES[name], device, dtype)
    fns = {"ours": fused, "eager": eager}
    if not args.no_compile:
        fns["compiled"] = torch.compile(eager, dynamic=False)
    leaves = [x.detach().requires_grad_() for x in logits]

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(logits, targets, kinds, weights, relation)

        return run

    def train(fn):
        return lambda: torch.autograd.grad(fn(leaves, targets, kinds, weights, relation)[0], leaves)

    fwd = compare({k: forward(f) for k, f in fns.items()}, args.rounds, min_time)
    both = compare({k: train(f) for k, f in fns.items()}, args.rounds, min_time)
    logits_bytes = sum(x.numel() * x.element_size() for x in logits)
    same_size = copy_bandwidth(device, logits_bytes // 4, args.rounds, min_time)  # float32 copy
    row = {
        "fwd_vs_eager": fwd["eager"] / fwd["ours"],
        "fwd_bwd_vs_eager": both["eager"] / both["ours"],
    }
    if "compiled" in fns:
        row["fwd_vs_compile"] = fwd["compiled"] / fwd["ours"]
        row["fwd_bwd_vs_compile"] = both["compiled"] / both["ours"]
    row.update(
        {
            "ours_fwd_us": fwd["ours"] * 1e6,
            "ours_fwd_bwd_us": both["ours"] * 1e6,
            "eager_fwd_bwd_us": both["eager"] * 1e6,
            "fwd_bwd_pct_of_bandwidth": 100 * 2 * logits_bytes / both["ours"] / bandwidth,
            "fwd_bwd_pct_of_same_size_copy": 100 * 2 * logits_bytes / both["ours"] / same_size,
            "logits_MB": logits_bytes / 2**20,
            "saved_ours_MB": saved_bytes(fused, logits, targets, kinds, weights, relation) / 2**20,
            "saved_eager_MB": saved_bytes(eager, logits, targets, kinds, weights, relation) / 2**20,
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
    min_time = 0.2 if args.quick else 0.5
    bandwidth = copy_bandwidth(device, 1 << 25, args.rounds, min_time)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for name in CASES:
        rows.append({"case": name, **bench_case(name, args, bandwidth)})
        print(
            f"  {name:15s} fwd {rows[-1]['fwd_vs_eager']:.2f}x eager, "
            f"fwd+bwd {rows[-1]['fwd_bwd_vs_eager']:.2f}x eager",
            flush=True,
        )
    print_table(rows, list(rows[0]))
    path = write_results(
        f"loss_{device.type}_{args.dtype}",
        {
            "benchmark": "bench_loss",
            "machine": machine(device),
            "build": mtlcore.build_info(),
            "copy_bandwidth_GBs": bandwidth / 1e9,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
