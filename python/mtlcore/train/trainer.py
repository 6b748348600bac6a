"""Trainer: fit, evaluate and predict a multi-task model; history and atomic checkpoints."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch import distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mtlcore.nn.loss import MultiTaskLoss
from mtlcore.nn.model import MultiTaskModel
from mtlcore.relations import AffinityMeter, lookahead_affinity
from mtlcore.tasks import Task, multitask_gain
from mtlcore.train.checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from mtlcore.train.plots import have_matplotlib, save_plots
from mtlcore.weighting import LossWeighting

if dist.is_available():
    # DistributedDataParallel imports this module on first use, and its functions take the
    # default group as default arguments: imported after init_process_group, they keep that
    # group alive for good (destroy_process_group then leaves gloo's threads running into the
    # interpreter's shutdown, where a rank can abort). Imported here, before a group exists,
    # their defaults are None.
    import torch.distributed.nn.functional

__all__ = ["Trainer"]

Batch = tuple[Tensor, dict[str, Tensor]]


def _task_gradients(per_task: Tensor, wrt: list[Tensor]) -> Tensor:
    """``[T, D]``: row i is the gradient of ``per_task[i]`` with respect to ``wrt``, flattened
    and concatenated (zeros where a task does not reach a tensor); the graph is kept."""
    rows = []
    for loss in per_task:
        grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(t)).float().flatten()
                    for g, t in zip(grads, wrt, strict=True)
                ]
            )
        )
    return torch.stack(rows)


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
        out_dir: where ``history.csv``, ``history.json``, ``checkpoint.pt`` (written
            atomically) and, with matplotlib installed, ``loss.png`` and ``metrics.png`` go
            after every epoch; None: nothing is written.
        progress: tqdm bars (default: when stderr is a terminal and tqdm is installed).
        affinity_every, affinity_lr: measure the lookahead inter-task affinity
            (:func:`mtlcore.relations.lookahead_affinity`, on the shared parameters) every
            that many steps; :meth:`affinity` averages it and ``seconds`` shows its cost.
        weighting: a strategy of :mod:`mtlcore.weighting` (None: the loss's own total).
            Loss-based ones scalarise the per-task losses (their parameters, e.g.
            uncertainty's, belong in the optimizer); gradient-based ones run on the gradients
            of the shared representation (see ``_representation_step``), or with
            ``weighting_on="parameters"`` on the full gradients of the shared parameters (one
            trunk backward per task). Under torch.distributed each rank combines its own
            batch's task gradients and the results are averaged over the ranks.
        compile: train through ``torch.compile`` of the model (True, or a dict of
            ``torch.compile`` arguments, e.g. ``{"backend": "aot_eager"}``); mtlcore's ops
            trace into the graph (fake kernels), and a last, smaller batch does not recompile
            after the second shape (dynamic sizes). A model compiled by the caller works too.
            Either way checkpoints, :meth:`evaluate` and :meth:`predict` use the plain module,
            so a checkpoint loads into an uncompiled model. Gradient-based weighting runs its
            own steps on the plain module.

    Distributed data parallel: when ``torch.distributed`` is initialised (e.g. under
    ``torchrun``; gloo on CPU, NCCL on GPU), each rank trains on its share of every batch
    (``batch_size`` per rank) through ``DistributedDataParallel``; only rank 0 writes files
    and shows progress.
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
        weighting: nn.Module | None = None,
        affinity_every: int = 0,
        affinity_lr: float = 0.01,
        weighting_on: str = "representation",
        compile: bool | dict[str, Any] = False,
    ) -> None:
        self.device = torch.device(device)
        if not isinstance(compile, bool | dict):
            raise TypeError(
                f"Trainer: compile must be a bool or a dict of torch.compile arguments, "
                f"got {type(compile).__name__}"
            )
        # A model the caller compiled trains as compiled; everything else (checkpoints,
        # evaluation, the heads and trunk of gradient-based weighting) uses the module inside,
        # so checkpoints load into the plain model.
        inner = getattr(model, "_orig_mod", None)
        compiled_model = model if isinstance(inner, nn.Module) else None
        self.model = (model if compiled_model is None else inner).to(self.device)
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
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.progress = self.is_main and (
            sys.stderr.isatty() if progress is None else bool(progress)
        )
        # Under torch.distributed the model trains wrapped in DistributedDataParallel (gradients
        # averaged over the ranks); checkpoints hold the unwrapped model.
        # Gradient-based weighting sets the gradients itself, so under torch.distributed it
        # averages them over the ranks by hand instead of through DDP's hooks.
        self._train_model: nn.Module = self.model
        self._manual_sync = self.distributed and bool(getattr(weighting, "gradient_based", False))
        if self.distributed and not self._manual_sync:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if compile or (compiled_model is not None and self._train_model is not self.model):
            # Our own compilation of the plain (or DDP) module: with `compile`, or for a model
            # the caller compiled that trains under DDP (torch.compile of the DDP module splits
            # the graph at its buckets; default options).
            options = compile if isinstance(compile, dict) else {}
            self._train_model = torch.compile(self._train_model, **options)
        elif compiled_model is not None:
            self._train_model = compiled_model  # the caller's compilation, as it is
        if weighting_on not in ("representation", "parameters"):
            raise ValueError(
                f"weighting_on must be 'representation' or 'parameters', got {weighting_on!r}"
            )
        self.weighting_on = weighting_on
        self.num_workers = int(num_workers)
        # Lookahead inter-task affinity, measured every `affinity_every` steps (0: never).
        self.affinity_every = int(affinity_every)
        self.affinity_lr = float(affinity_lr)
        self.affinity_meter = AffinityMeter(len(self.tasks))
        self.seconds = {"train": 0.0, "affinity": 0.0}
        self._step = 0
        self.weighting = weighting.to(self.device) if weighting is not None else None
        self._weighting_needs_after_step = isinstance(weighting, LossWeighting) and (
            type(weighting).after_step is not LossWeighting.after_step
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        # Anything the caller wants in checkpoints (e.g. how to rebuild the model).
        self.config: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------
    # Data
    # ---------------------------------------------------------------------------------------

    def _loader(self, data: Dataset, shuffle: bool, epoch: int = 0) -> DataLoader:
        """Training order: one permutation per epoch drawn from (seed, epoch) alone, split
        over the ranks (rank r takes every world_size-th index), so a run on R ranks with
        batch B sees, step by step, the samples a 1-process run with batch R * B sees.
        Evaluation: every rank reads everything, in order."""
        if not shuffle:
            return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers)
        sampler = DistributedSampler(
            data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed
        )
        sampler.set_epoch(epoch)
        return DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers
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
        start = time.perf_counter()
        try:
            return self._train_epoch(data)
        finally:
            self.seconds["train"] += time.perf_counter() - start

    def _train_epoch(self, data: Dataset) -> dict[str, float]:
        self.model.train()
        # Losses summed on the device (float64) and read once per epoch: no host
        # synchronisation per step.
        keys = ["total", *self.loss.names]
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        batches = 0
        loader = self._loader(data, shuffle=True, epoch=self.epoch)
        for x, y in self._batches(loader, f"epoch {self.epoch + 1}"):
            self.optimizer.zero_grad(set_to_none=True)
            if self.weighting is not None and self.weighting.gradient_based:
                total, parts = self._representation_step(x, y)
            else:
                with self._autocast():
                    total, parts = self.loss(self._train_model(x), y)
                    if self.weighting is not None:
                        total = self.weighting.total(torch.stack(list(parts.values())))
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(total).backward()
                else:
                    total.backward()
            self._average_loss_gradients()
            if self.grad_scaler is not None:
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                self.optimizer.step()
            if self._weighting_needs_after_step:
                with torch.no_grad(), self._autocast():
                    _, after = self.loss(self._train_model(x), y)
                self.weighting.after_step(torch.stack(list(after.values())))
            batches += 1
            self._step += 1
            if self.affinity_every and self._step % self.affinity_every == 0:
                self._measure_affinity(x, y)
            step_losses = [total.detach(), *(parts[k].detach() for k in keys[1:])]
            sums += torch.stack(step_losses).to(torch.float64)
        means = sums / max(batches, 1)
        if self.distributed:  # the history holds the mean over the ranks
            dist.all_reduce(means)
            means /= self.world_size
        if self.weighting is not None and not self.weighting.gradient_based:
            self.weighting.end_epoch(means[1:].cpu())
        return dict(zip(keys, means.tolist(), strict=True))

    def _representation_step(self, x: Tensor, y: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """A gradient-based weighting step on the shared representation: the trunk runs
        forward once, each task's gradient with respect to the trunk's outputs comes from its
        head alone (the fused loss already holds each task's logit gradient), the strategy
        combines them, and the trunk runs backward once on the combined gradient. The heads
        are trained with the weights the strategy reports."""
        model = self.model
        if not isinstance(model, MultiTaskModel):
            raise ValueError("gradient-based weighting needs a MultiTaskModel (trunk + heads)")
        if self.weighting_on == "parameters":
            return self._parameter_step(x, y)
        with self._autocast():
            if model._map_heads:
                feature_map, vector = model.trunk.features(x)
                reps = [vector, feature_map]
            else:
                reps = [model.trunk(x)]
            leaves = [r.detach().requires_grad_() for r in reps]
            out = {
                name: head(leaves[1] if name in model._map_heads else leaves[0])
                for name, head in model.heads.items()
            }
            total, parts = self.loss(out, y)
        per_task = torch.stack(list(parts.values()))
        combined = self._combine_and_train_heads(_task_gradients(per_task, leaves), per_task)
        pieces = combined.split([leaf.numel() for leaf in leaves])
        torch.autograd.backward(
            reps, [p.view_as(r).to(r.dtype) for p, r in zip(pieces, reps, strict=True)]
        )
        return total.detach(), parts

    def _combine_and_train_heads(self, rows: Tensor, per_task: Tensor) -> Tensor:
        """Combines the task gradients, trains the heads (and the loss's parameters) with the
        weights the strategy reports; returns the combined gradient, scaled for a GradScaler."""
        combined, weights = self.weighting.combine(rows, per_task.detach())
        head_loss = (weights.detach().to(per_task) * per_task).sum()
        if self.grad_scaler is not None:
            # The scaler's step expects scaled gradients, and a first scale() to set itself up
            # (the scale stays a tensor: no host synchronisation).
            head_loss, combined = (
                self.grad_scaler.scale(head_loss),
                self.grad_scaler.scale(combined),
            )
        head_loss.backward(inputs=self._head_params())
        return combined

    def _parameter_step(self, x: Tensor, y: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """A gradient-based weighting step on the full gradients of the shared (trunk)
        parameters: one backward through the trunk per task."""
        shared = [p for p in self.model.shared_parameters() if p.requires_grad]
        with self._autocast():
            total, parts = self.loss(self.model(x), y)
        per_task = torch.stack(list(parts.values()))
        combined = self._combine_and_train_heads(_task_gradients(per_task, shared), per_task)
        for p, piece in zip(shared, combined.split([p.numel() for p in shared]), strict=True):
            g = piece.view_as(p).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        return total.detach(), parts

    def _measure_affinity(self, x: Tensor, y: dict[str, Tensor]) -> None:
        start = time.perf_counter()
        shared = (
            self.model.shared_parameters()
            if hasattr(self.model, "shared_parameters")
            else list(self.model.parameters())
        )

        def losses() -> Tensor:
            with self._autocast():
                _, parts = self.loss(self.model(x), y)
            return torch.stack(list(parts.values())).float()

        self.affinity_meter.update(lookahead_affinity(losses, shared, self.affinity_lr))
        self.seconds["affinity"] += time.perf_counter() - start

    def affinity(self) -> Tensor:
        """The mean lookahead affinity ``Z[i, j]`` measured so far (``affinity_every``)."""
        return self.affinity_meter.value()

    def _head_params(self) -> list[nn.Parameter]:
        params = [p for p in self.model.heads.parameters() if p.requires_grad]
        return params + [p for p in self.loss.parameters() if p.requires_grad]

    def _average_loss_gradients(self) -> None:
        """DDP averages the model's gradients (here too when it is not used: gradient-based
        weighting); the loss's learnable parameters (uncertainty weights, relation) are
        averaged here."""
        if not self.distributed:
            return
        params = list(self.loss.parameters())
        if self._manual_sync:
            params += list(self.model.parameters())
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

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
            if self.out_dir is not None and self.is_main:
                self._write_history()
                if have_matplotlib():
                    save_plots(self.history, self.out_dir)
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
            "config": self.config,
            "weighting": self.weighting.state_dict() if self.weighting is not None else None,
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
        self.config = dict(state.get("config", {}))
        if self.weighting is not None and state.get("weighting") is not None:
            self.weighting.load_state_dict(state["weighting"])
        set_rng_state(state["rng"])

    def save(self, path: str | Path) -> Path:
        """An atomic checkpoint of everything a resumed run needs (written by rank 0 only)."""
        path = Path(path)
        if self.is_main:
            save_checkpoint(self.state_dict(), path)
        return path

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
