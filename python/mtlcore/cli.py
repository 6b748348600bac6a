"""Command line: ``python -m mtlcore <command>``.

Commands:
  info   how this copy was built and which kernels it runs (build_info)
  demo   trains a small model with mtlcore.optim and prints its loss falling
  train     trains SmallCNN with one head per task on a multi-task set, then evaluates it
  evaluate  evaluates a checkpoint written by train on its data's test split
  affinity  trains briefly, prints the tasks' lookahead affinity and the best task grouping
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

# The names of mtlcore.weighting.STRATEGIES (not imported here: the CLI starts fast).
STRATEGY_NAMES = (
    "equal",
    "uncertainty",
    "dwa",
    "rlw",
    "famo",
    "gradnorm",
    "pcgrad",
    "mgda",
    "cagrad",
)


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


def _guarded(command: str, problem: str | None, run: Callable[[], object]) -> int:
    """Exit code 2 with a one-line message for bad arguments (``problem``) or for missing or
    corrupt data (FileNotFoundError / ValueError from ``run``); 0 otherwise."""
    if problem:
        print(f"mtlcore {command}: {problem}", file=sys.stderr)
        return 2
    try:
        run()
    except (FileNotFoundError, ValueError) as e:
        print(f"mtlcore {command}: {e}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    from mtlcore.train.job import train_job

    samples_ok = args.samples is None or args.samples >= 4
    bad = args.epochs < 1 or args.batch_size < 1 or not samples_ok or args.lr <= 0
    bad = bad or (args.resume and args.out is None)
    return _guarded(
        "train",
        "--epochs and --batch-size must be >= 1, --samples >= 4, --lr > 0; --resume needs --out"
        if bad
        else None,
        lambda: train_job(
            data=args.data,
            data_dir=args.data_dir,
            baselines=args.baselines,
            compare_plain=args.compare_plain,
            weighting=args.weighting,
            weighting_on=args.weighting_on,
            autocast=args.autocast,
            compile=args.compile,
            epochs=args.epochs,
            batch_size=args.batch_size,
            samples=args.samples,
            optimizer=args.optimizer,
            lr=args.lr,
            device=args.device,
            seed=args.seed,
            out_dir=args.out,
            progress=False if args.no_progress else None,
            resume=args.resume,
        ),
    )


def _evaluate(args: argparse.Namespace) -> int:
    from mtlcore.train.job import evaluate_checkpoint

    return _guarded(
        "evaluate",
        None,
        lambda: evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device),
    )


def _affinity(args: argparse.Namespace) -> int:
    from mtlcore.train.job import affinity_job

    bad = args.epochs < 1 or args.every < 1 or args.groups < 1
    return _guarded(
        "affinity",
        "--epochs, --every and --groups must be >= 1" if bad else None,
        lambda: affinity_job(
            data=args.data,
            data_dir=args.data_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            samples=args.samples,
            every=args.every,
            num_groups=args.groups,
            device=args.device,
            seed=args.seed,
            out_dir=args.out,
        ),
    )


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
    train = sub.add_parser("train", help="train and evaluate a multi-task model")
    train.add_argument(
        "--data", choices=["auto", "multifashion", "shapes", "cifar10"], default="auto"
    )
    train.add_argument(
        "--data-dir", default=None, help="folder with the Fashion-MNIST or CIFAR-10 files"
    )
    train.add_argument(
        "--baselines", action="store_true", help="also train one single-task model per task"
    )
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--samples", type=int, default=None, help="training images (a subset)")
    train.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--device", default="cpu")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="folder for history and checkpoints")
    train.add_argument(
        "--weighting",
        choices=sorted(STRATEGY_NAMES),
        default=None,
        help="loss-weighting strategy (default: the task weights, all 1)",
    )
    train.add_argument(
        "--weighting-on",
        choices=["representation", "parameters"],
        default="representation",
        help="gradients a gradient-based weighting combines: of the trunk's outputs (one "
        "trunk backward) or of the shared parameters (one trunk backward per task)",
    )
    train.add_argument(
        "--autocast",
        choices=["bfloat16", "float16"],
        default=None,
        help="run forward and loss under torch.autocast in this dtype (bfloat16 on the CPU; "
        "float16 adds a GradScaler)",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="train through torch.compile (mtlcore's ops trace into the graph)",
    )
    train.add_argument(
        "--compare-plain",
        action="store_true",
        help="also time a training step against the same model in plain PyTorch",
    )
    train.add_argument("--no-progress", action="store_true")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt when it exists (after a crash or a kill)",
    )
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint written by train")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data-dir", default=None)
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=_evaluate)
    aff = sub.add_parser("affinity", help="measure inter-task affinity and group the tasks")
    aff.add_argument(
        "--data", choices=["auto", "multifashion", "shapes", "cifar10"], default="auto"
    )
    aff.add_argument("--data-dir", default=None)
    aff.add_argument("--epochs", type=int, default=1)
    aff.add_argument("--batch-size", type=int, default=64)
    aff.add_argument("--samples", type=int, default=None)
    aff.add_argument("--every", type=int, default=10, help="measure every this many steps")
    aff.add_argument("--groups", type=int, default=2)
    aff.add_argument("--device", default="cpu")
    aff.add_argument("--seed", type=int, default=0)
    aff.add_argument("--out", default=None, help="folder for affinity.json and affinity.png")
    aff.set_defaults(func=_affinity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
