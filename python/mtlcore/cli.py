"""Command line: ``python -m mtlcore <command>``.

Commands:
  info   how this copy was built and which kernels it runs (build_info)
  demo   trains a small model with mtlcore.optim and prints its loss falling
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    import mtlcore

    print(json.dumps(mtlcore.build_info(), indent=2, sort_keys=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from mtlcore.demo import train_demo

    device = torch.device(args.device) if args.device else None
    losses = train_demo(
        steps=args.steps, optimizer=args.optimizer, device=device, seed=args.seed, log=print
    )
    return 0 if losses[-1] < losses[0] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtlcore",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="train a small model with mtlcore.optim")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam")
    demo.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
