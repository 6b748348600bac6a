"""Fused optimizer step: mtlcore.optim vs torch.optim(fused=True), same run, ratios.

Cases: the small CNN's parameter set (conv 3->32, conv 32->64, dense 2304->128, dense 128->10,
biases), 10M parameters in 20 tensors, 100M parameters (in 10 tensors). For each, one
``optimizer.step()`` of SGD (momentum 0.9, weight decay) and Adam, ours and torch's fused
implementation, plus the bandwidth our step achieves against a large copy measured in the same
run (SGD moves 3 reads + 2 writes per element, Adam 4 reads + 3 writes).

    python bench/bench_optim.py [--device cuda] [--quick]

Results: bench/results/optim_<device>.json (or under $OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import compare, copy_bandwidth, machine, print_table, write_results

import mtlcore
from mtlcore import optim

SMALL_CNN = [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 2304), (128,), (10, 128), (10,)]


def cases(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    out = {
        "small_cnn": SMALL_CNN,
        "10M_in_20": [(500_000,)] * 20,
        "100M_in_10": [(10_000_000,)] * 10,
    }
    if quick:
        out.pop("100M_in_10")
    return out


BYTES_PER_ELEMENT = {"sgd": 5 * 4, "adam": 7 * 4}  # fp32 reads + writes per element


def make(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(s, generator=gen).to(device) * 1e-3
        params.append(p)
    return params


def optimizers(kind: str, device):
    if kind == "sgd":
        kw = dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)
        return (lambda ps: optim.SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, fused=True, **kw))
    kw = dict(lr=1e-4, weight_decay=1e-4)
    return (lambda ps: optim.Adam(ps, **kw), lambda ps: torch.optim.Adam(ps, fused=True, **kw))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="skip 100M, shorter timing")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    min_time = 0.2 if args.quick else 0.5

    bandwidth = copy_bandwidth(
        device, 50_000_000 if not args.quick else 10_000_000, args.rounds, min_time
    )
    rows = []
    for case, shapes in cases(args.quick).items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        for kind in ("sgd", "adam"):
            make_ours, make_theirs = optimizers(kind, device)
            p_ours, p_theirs = make(shapes, device), make(shapes, device)
            ours, theirs = make_ours(p_ours), make_theirs(p_theirs)
            t = compare({"ours": ours.step, "torch_fused": theirs.step}, args.rounds, min_time)
            achieved = BYTES_PER_ELEMENT[kind] * numel / t["ours"]
            rows.append(
                {
                    "case": case,
                    "optimizer": kind,
                    "params": numel,
                    "ours_ms": t["ours"] * 1e3,
                    "torch_fused_ms": t["torch_fused"] * 1e3,
                    "speedup_vs_torch_fused": t["torch_fused"] / t["ours"],
                    "ours_GBps": achieved / 1e9,
                    "pct_of_copy_bandwidth": 100 * achieved / bandwidth,
                }
            )
            del p_ours, p_theirs, ours, theirs
            print(
                f"  {case:12s} {kind:5s} speedup {rows[-1]['speedup_vs_torch_fused']:.2f}x",
                flush=True,
            )
    print_table(
        rows,
        [
            "case",
            "optimizer",
            "params",
            "ours_ms",
            "torch_fused_ms",
            "speedup_vs_torch_fused",
            "ours_GBps",
            "pct_of_copy_bandwidth",
        ],
    )
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.1f} GB/s")
    path = write_results(
        f"optim_{device.type}",
        {
            "benchmark": "bench_optim",
            "machine": machine(device),
            "build": mtlcore.build_info(),
            "copy_bandwidth_GBps": bandwidth / 1e9,
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
