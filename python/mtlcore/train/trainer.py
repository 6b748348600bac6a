"""Trainer: fit, evaluate and predict a multi-task model; history and atomic checkpoints."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mtlcore.nn.loss import MultiTaskLoss
from mtlcore.tasks import Task, multitask_gain
from mtlcore.train.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state

__all__ = ["Trainer"]

Batch = tuple[Tensor, dict[str, Tensor]]


class Trainer:
    """Trains a model whose forward returns ``{task: output}`` on data whose samples are
    ``(input, {task: target})`` (missing labels: ``ignore_index`` / NaN).

    Args:
        model: e.g. :class:`mtlcore.nn.MultiTaskModel`.
        tasks: the :class:`mtlcore.Task` list (names match the model's outputs).
        optimizer: over the model's (and the loss's learnable) parameters.
        loss: a :class:`mtlcore.nn.MultiTaskLoss`; default: fixed task weights from ``tasks``.
        device: where to train (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); nothing is hard-coded.
        batch_size, seed: the data order of epoch ``e`` is a permutation drawn from
            ``seed`` and ``e`` alone, so a resumed run sees the same batches.
        autocast_dtype: run forward and loss under ``torch.autocast`` in this dtype (bf16 on
            CPU; fp16/bf16 on CUDA). grad_scaler: a ``torch.amp.GradScaler`` for fp16.
        out_dir: where ``history.csv``, ``history.json`` and ``checkpoint.pt`` (after every
            epoch, written atomically) go; None: nothing is written.
        progress: tqdm bars (default: when stderr is a terminal and tqdm is installed).
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        optimizer: torch.optim.Optimizer,
        loss: MultiTaskLoss | None = None,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 64,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        out_dir: str | Path | None = None,
        progress: bool | None = None,
        num_workers: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.tasks = list(tasks)
        self.loss = (
            loss if loss is not None else MultiTaskLoss(self.tasks, [t.weight for t in self.tasks])
        ).to(self.device)
        if list(self.loss.names) != [t.name for t in self.tasks]:
            raise ValueError("Trainer: the loss's tasks differ from `tasks`")
        self.optimizer = optimizer
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.autocast_dtype = autocast_dtype
        self.grad_scaler = grad_scaler
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.num_workers = int(num_workers)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------

    def _loader(self, data: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def _batches(self, loader: DataLoader, desc: str) -> Iterator[Batch]:
        bar = None
        if self.progress:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                bar = tqdm(total=len(loader), desc=desc, leave=False)
        for x, y in loader:
            yield x.to(self.device), {k: v.to(self.device) for k, v in y.items()}
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---------------------------------------------------------------------------------------
    # Training
    # ---------------------------------------------------------------------------------------

    def train_epoch(self, data: Dataset) -> dict[str, float]:
        """One pass over ``data``; returns the mean total and per-task training losses."""
        self.model.train()
        sums: dict[str, float] = {}
        batches = 0
        loader = self._loader(data, shuffle=True, epoch=self.epoch)
        for x, y in self._batches(loader, f"epoch {self.epoch + 1}"):
            with self._autocast():
                total, parts = self.loss(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.grad_scaler is not None:
                self.grad_scaler.scale(total).backward()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                total.backward()
                self.optimizer.step()
            batches += 1
            for k, v in {"total": total, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        return {k: v / max(batches, 1) for k, v in sums.items()}

    def fit(
        self, train: Dataset, epochs: int, val: Dataset | None = None
    ) -> list[dict[str, float]]:
        """Trains until ``epochs`` epochs are done in all (a resumed trainer continues from its
        epoch); after each: history row, files and checkpoint when ``out_dir`` is set."""
        while self.epoch < epochs:
            losses = self.train_epoch(train)
            self.epoch += 1
            row: dict[str, float] = {"epoch": float(self.epoch)}
            row.update({f"train_loss/{k}": v for k, v in losses.items()})
            if val is not None:
                for task, metrics in self.evaluate(val).items():
                    row.update({f"val/{task}/{m}": v for m, v in metrics.items()})
            self.history.append(row)
            if self.out_dir is not None:
                self._write_history()
                self.save(self.out_dir / "checkpoint.pt")
        return self.history

    # ---------------------------------------------------------------------------------------
    # Evaluation
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, data: Dataset, baselines: dict[str, dict[str, float]] | None = None
    ) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` over ``data``; with single-task ``baselines`` also
        ``{"multitask_gain": {"delta_m": Δm%}}``."""
        self.model.eval()
        metrics = {t.name: t.new_metrics(self.loss.ignore_index) for t in self.tasks}
        for x, y in self._batches(self._loader(data, shuffle=False), "evaluate"):
            with self._autocast():
                out = self.model(x)
            for task in self.tasks:
                for m in metrics[task.name].values():
                    m.update(out[task.name].float(), y[task.name])
        results = {t: {k: m.compute() for k, m in ms.items()} for t, ms in metrics.items()}
        if baselines is not None:
            results["multitask_gain"] = {"delta_m": multitask_gain(self.tasks, results, baselines)}
        return results

    @torch.no_grad()
    def predict(self, data: Dataset) -> dict[str, Tensor]:
        """Every task's outputs over ``data``, concatenated in order, on the CPU."""
        self.model.eval()
        outputs: dict[str, list[Tensor]] = {t.name: [] for t in self.tasks}
        for x, _ in self._batches(self._loader(data, shuffle=False), "predict"):
            with self._autocast():
                out = self.model(x)
            for name in outputs:
                outputs[name].append(out[name].float().cpu())
        return {k: torch.cat(v) for k, v in outputs.items()}

    # ---------------------------------------------------------------------------------------
    # Checkpoints and history
    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None,
            "history": self.history,
            "rng": get_rng_state(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        if self.grad_scaler is not None and state.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.seed = int(state["seed"])
        set_rng_state(state["rng"])

    def save(self, path: str | Path) -> Path:
        """An atomic checkpoint of everything a resumed run needs."""
        return save_checkpoint(self.state_dict(), path)

    def resume(self, path: str | Path) -> None:
        """Loads a checkpoint written by :meth:`save`; :meth:`fit` then continues from it."""
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    def _write_history(self) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        columns = sorted({k for row in self.history for k in row}, key=lambda k: (k != "epoch", k))
        with open(self.out_dir / "history.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.history)
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")
