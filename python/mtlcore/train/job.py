"""The main job (``python -m mtlcore train``): SmallCNN with one head per task, trained with the
fused loss and optimizer on MultiFashion or Shapes, evaluated per task, optionally next to
single-task baselines trained with the same budget (and the multi-task gain Δm%)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import distributed as dist
from torch.utils.data import Dataset

from mtlcore import optim
from mtlcore.data import CIFAR10MultiTask, MultiFashion, Shapes, find_fashion_mnist
from mtlcore.models import SmallCNN
from mtlcore.nn import DenseHead, LinearHead, MultiTaskModel
from mtlcore.tasks import Task
from mtlcore.train.trainer import Trainer

__all__ = ["evaluate_checkpoint", "load_data", "make_trainer", "train_job"]


def load_data(
    data: str, samples: int | None, seed: int, data_dir: str | None, log: Callable[[str], None]
) -> tuple[Dataset, Dataset, list[Task], int, int]:
    """(train, test, tasks, channels, image size) of ``data``: shapes, multifashion, or auto
    (MultiFashion when its files are found, else Shapes, saying so)."""
    if data == "auto":
        data = "multifashion" if find_fashion_mnist(data_dir) is not None else "shapes"
        if data == "shapes":
            log(
                "Fashion-MNIST not found (install dataset-fashion-mnist or pass --data-dir): "
                "training on the built-in Shapes set instead"
            )
    if data == "multifashion":
        train = MultiFashion("train", data_dir, seed, samples)
        test = MultiFashion("test", data_dir, seed, None if samples is None else samples // 4)
        return train, test, MultiFashion.tasks(), 1, 36
    if data == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir (the cifar-10-batches-py folder)")
        train, test = CIFAR10MultiTask(data_dir, "train"), CIFAR10MultiTask(data_dir, "test")
        if samples is not None:
            train = torch.utils.data.Subset(train, range(min(samples, len(train))))
        return train, test, CIFAR10MultiTask.tasks(), 3, 32
    if data == "shapes":
        n = 4000 if samples is None else samples
        train, test = Shapes(n, "train", seed=seed), Shapes(max(n // 4, 1), "test", seed=seed)
        return train, test, train.tasks(), 3, train.image_size
    raise ValueError(f"unknown data {data!r}; expected auto, shapes, multifashion or cifar10")


def build_model(tasks: Sequence[Task], channels: int, image_size: int) -> MultiTaskModel:
    trunk = SmallCNN(channels, image_size)
    heads = {
        t.name: DenseHead(trunk.map_channels, t.num_outputs, image_size)
        if t.dense
        else LinearHead(trunk.out_features, t.num_outputs)
        for t in tasks
    }
    return MultiTaskModel(trunk, heads)


def make_trainer(
    tasks: Sequence[Task],
    channels: int,
    size: int,
    *,
    seed: int,
    weighting: str | None = None,
    optimizer: str = "adam",
    lr: float = 2e-3,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    weighting_on: str = "representation",
    autocast: str | None = None,
    model: torch.nn.Module | None = None,
    **trainer_kwargs,
) -> Trainer:
    """The main job's Trainer: seeds torch, builds the SmallCNN model with one head per task
    (unless ``model`` is given), the weighting strategy named ``weighting`` (multi-task only)
    and the fused ``optimizer`` (adam, or sgd with momentum 0.9) over the model's and the
    strategy's parameters. ``autocast`` ("bfloat16" or "float16") runs forward and loss under
    ``torch.autocast`` in that dtype, float16 with a ``GradScaler``. ``trainer_kwargs`` go to
    :class:`Trainer`."""
    if autocast not in (None, "bfloat16", "float16"):
        raise ValueError(f"autocast must be 'bfloat16' or 'float16', got {autocast!r}")
    torch.manual_seed(seed)
    model = model if model is not None else build_model(tasks, channels, size)
    strategy = None
    if weighting is not None and len(tasks) > 1:
        from mtlcore import weighting as strategies

        strategy = strategies.get(weighting, len(tasks))
    params = list(model.parameters()) + (list(strategy.parameters()) if strategy else [])
    if optimizer == "adam":
        opt: torch.optim.Optimizer = optim.Adam(params, lr=lr)
    else:
        opt = optim.SGD(params, lr=lr, momentum=0.9)
    scaler = torch.amp.GradScaler(torch.device(device).type) if autocast == "float16" else None
    return Trainer(
        model,
        tasks,
        opt,
        device=device,
        batch_size=batch_size,
        seed=seed,
        weighting=strategy,
        weighting_on=weighting_on,
        autocast_dtype=getattr(torch, autocast) if autocast is not None else None,
        grad_scaler=scaler,
        **trainer_kwargs,
    )


def _fit(
    tasks: Sequence[Task],
    train: Dataset,
    test: Dataset,
    channels: int,
    size: int,
    args: dict,
    log: Callable[[str], None],
    out_dir: str | None = None,
) -> tuple[dict[str, dict[str, float]], float]:
    trainer = make_trainer(
        tasks,
        channels,
        size,
        seed=args["seed"],
        weighting=args["weighting"],
        optimizer=args["optimizer"],
        lr=args["lr"],
        batch_size=args["batch_size"],
        device=args["device"],
        weighting_on=args["weighting_on"],
        autocast=args["autocast"],
        compile=args["compile"],
        out_dir=out_dir,
        progress=args["progress"],
    )
    # What `python -m mtlcore evaluate` needs to rebuild the model and find the data.
    trainer.config = {
        "data": args["data"],
        "data_dir": args["data_dir"],
        "samples": args["samples"],
        "seed": args["seed"],
    }
    checkpoint = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if args.get("resume") and checkpoint is not None and checkpoint.exists():
        config = trainer.config
        trainer.resume(checkpoint)
        if trainer.config != config:
            raise ValueError(
                f"{checkpoint} was written by a run with other data arguments "
                f"({trainer.config}), not {config}"
            )
        log(f"  resumed from {checkpoint} (epoch {trainer.epoch})")
    first = trainer.epoch + 1
    start = time.perf_counter()
    for epoch in range(first, args["epochs"] + 1):
        row = trainer.fit(train, epochs=epoch)[-1]
        log(f"  epoch {epoch}: train loss {row['train_loss/total']:.4f}")
    trained = max(args["epochs"] - first + 1, 0) * len(train)
    images_per_s = trained / max(time.perf_counter() - start, 1e-9)
    return trainer.evaluate(test), images_per_s


@contextlib.contextmanager
def _distributed(
    device: str, log: Callable[[str], None]
) -> Iterator[tuple[str, Callable[[str], None]]]:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL for CUDA, gloo on the
    CPU), gives each rank its GPU, and lets only rank 0 print. A group created here is destroyed
    on the way out, while the interpreter is fully alive: a rank that leaves gloo's threads
    running into the interpreter's shutdown may abort there."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device, log
        return
    cuda = torch.device(device).type == "cuda"
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        yield device, (log if dist.get_rank() == 0 else (lambda _msg: None))
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _step_throughput(
    tasks: Sequence[Task], data: Dataset, channels: int, size: int, batch: int, device: str
) -> tuple[float, float]:
    """Images/s of one training step, mtlcore's fused model vs its plain-PyTorch twin (same
    weights), measured alternately in this process."""
    import torch.utils.benchmark as tbench

    from mtlcore.train.plain import fused_step, plain_step, twin_models

    if any(t.dense for t in tasks):  # the twins carry vector heads only
        tasks = [t for t in tasks if not t.dense]
    (fused, loss, fused_opt), (plain, plain_opt) = twin_models(tasks, channels, size)
    fused.to(device), loss.to(device), plain.to(device)
    samples = [data[i] for i in range(min(batch, len(data)))]
    x = torch.stack([s[0] for s in samples]).to(device)
    y = {t.name: torch.stack([s[1][t.name] for s in samples]).to(device) for t in tasks}
    steps = {
        "fused": lambda: fused_step(fused, loss, fused_opt, x, y),
        "plain": lambda: plain_step(plain, plain_opt, tasks, x, y),
    }
    best = {}
    for _ in range(3):
        for name, fn in steps.items():
            t = tbench.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median
            best[name] = min(best.get(name, t), t)
    return x.shape[0] / best["fused"], x.shape[0] / best["plain"]


def train_job(
    *,
    data: str = "auto",
    data_dir: str | None = None,
    epochs: int = 3,
    batch_size: int = 64,
    samples: int | None = None,
    optimizer: str = "adam",
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    out_dir: str | None = None,
    baselines: bool = False,
    compare_plain: bool = False,
    weighting: str | None = None,
    weighting_on: str = "representation",
    autocast: str | None = None,
    compile: bool = False,
    progress: bool | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Trains and evaluates; returns ``{task: {metric: value}}`` on the test split (plus
    ``multitask_gain`` with ``baselines``). With ``resume`` and ``out_dir``, the multi-task
    model continues from ``out_dir/checkpoint.pt`` when it exists (a run that was stopped or
    killed ends with the parameters an uninterrupted one reaches). ``compile`` trains
    through ``torch.compile`` (see :class:`Trainer`)."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    with _distributed(device, log) as (device, log):
        train, test, tasks, channels, size = load_data(data, samples, seed, data_dir, log)
        data = {MultiFashion: "multifashion", Shapes: "shapes"}.get(type(train), "cifar10")
        args = {
            "data": data,
            "data_dir": data_dir,
            "samples": samples,
            "weighting": weighting,
            "weighting_on": weighting_on,
            "autocast": autocast,
            "compile": compile,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "lr": lr,
            "device": device,
            "seed": seed,
            "progress": progress,
            "resume": resume,
        }
        log(
            f"{type(train).__name__}: {len(train)} train / {len(test)} test images; tasks: "
            + ", ".join(f"{t.name} ({t.kind})" for t in tasks)
        )
        log("multi-task model (one SmallCNN trunk, one head per task):")
        results, speed = _fit(tasks, train, test, channels, size, args, log, out_dir)
        log(f"  {speed:.0f} images/s on {device} (training)")
        single: dict[str, dict[str, float]] = {}
        if baselines:
            for task in tasks:
                log(f"single-task baseline: {task.name}")
                single[task.name] = _fit([task], train, test, channels, size, args, log)[0][
                    task.name
                ]
        log("test metrics" + (" (multi-task | single-task)" if baselines else "") + ":")
        for task in tasks:
            cells = []
            for m, v in results[task.name].items():
                cells.append(
                    f"{m} {v:.4f}" + (f" | {single[task.name][m]:.4f}" if baselines else "")
                )
            log(f"  {task.name:9s} " + ", ".join(cells))
        if compare_plain:
            fused_speed, plain_speed = _step_throughput(
                tasks, train, channels, size, batch_size, device
            )
            log(
                f"training step of this model (batch {batch_size}): mtlcore "
                f"{fused_speed:.0f} images/s, plain PyTorch {plain_speed:.0f} images/s "
                f"({fused_speed / plain_speed:.2f}x)"
            )
        if baselines:
            from mtlcore.tasks import multitask_gain

            gain = multitask_gain(tasks, results, single)
            results["multitask_gain"] = {"delta_m": gain}
            log(f"  multi-task gain over the single-task models: {gain:+.2f}%")
        return results


def evaluate_checkpoint(
    checkpoint: str,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Rebuilds the model of a ``train`` checkpoint, evaluates it on its data's test split and
    prints ``{task: {metric: value}}``."""
    from mtlcore.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint, map_location=device)
    config = state.get("config") or {}
    if "data" not in config:
        raise ValueError(f"{checkpoint}: not a checkpoint of `python -m mtlcore train`")
    _, test, tasks, channels, size = load_data(
        config["data"], config["samples"], config["seed"], data_dir or config["data_dir"], log
    )
    model = build_model(tasks, channels, size)
    model.load_state_dict(state["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # unused: evaluation only
    trainer = Trainer(model, tasks, opt, device=device, batch_size=batch_size, progress=False)
    results = trainer.evaluate(test)
    log(f"{checkpoint} (epoch {state['epoch']}), {type(test).__name__} test split:")
    for task in tasks:
        log(f"  {task.name:9s} " + ", ".join(f"{m} {v:.4f}" for m, v in results[task.name].items()))
    return results


def affinity_job(
    *,
    data: str = "auto",
    data_dir: str | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    samples: int | None = None,
    every: int = 10,
    num_groups: int = 2,
    lookahead_lr: float = 0.01,
    lr: float = 2e-3,
    device: str = "cpu",
    seed: int = 0,
    out_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[torch.Tensor, list[list[str]]]:
    """Trains briefly while measuring the lookahead inter-task affinity every ``every`` steps;
    prints the matrix, the best grouping into ``num_groups`` groups and the measuring overhead;
    writes ``affinity.json`` and (with matplotlib) ``affinity.png`` to ``out_dir``."""
    import json

    from mtlcore.relations import group_tasks

    train, _, tasks, channels, size = load_data(data, samples, seed, data_dir, log)
    if not 1 <= num_groups <= len(tasks):
        raise ValueError(f"--groups must be in [1, {len(tasks)}], got {num_groups}")
    torch.manual_seed(seed)
    model = build_model(tasks, channels, size)
    trainer = Trainer(
        model,
        tasks,
        optim.Adam(model.parameters(), lr=lr),
        device=device,
        batch_size=batch_size,
        seed=seed,
        progress=False,
        affinity_every=every,
        affinity_lr=lookahead_lr,
    )
    trainer.fit(train, epochs=epochs)
    affinity = trainer.affinity()
    names = [t.name for t in tasks]
    groups = [[names[i] for i in g] for g in group_tasks(affinity, num_groups)]
    overhead = trainer.seconds["affinity"] / max(trainer.seconds["train"], 1e-9)
    log(
        f"lookahead affinity Z[i, j] (row i: a step on task i; {trainer.affinity_meter.count} "
        "measurements):"
    )
    log("          " + " ".join(f"{n[:8]:>8s}" for n in names))
    for n, row in zip(names, affinity.tolist(), strict=True):
        log(f"{n[:9]:9s} " + " ".join(f"{v:8.4f}" for v in row))
    log(f"best grouping into {num_groups}: " + " | ".join(", ".join(g) for g in groups))
    log(f"measuring cost: {100 * overhead:.1f}% of the training time")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "affinity.json").write_text(
            json.dumps(
                {
                    "tasks": names,
                    "affinity": affinity.tolist(),
                    "groups": groups,
                    "overhead": overhead,
                },
                indent=1,
            )
            + "\n"
        )
        from mtlcore.train.plots import have_matplotlib, save_heatmap

        if have_matplotlib():
            save_heatmap(affinity, names, out / "affinity.png", "lookahead affinity")
    return affinity, groups
