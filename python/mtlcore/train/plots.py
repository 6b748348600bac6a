"""PNG plots of a training history (matplotlib: the optional extra `mtlcore[plot]`)."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from pathlib import Path

__all__ = ["have_matplotlib", "save_heatmap", "save_plots"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_plots(history: Sequence[dict[str, float]], out_dir: str | Path) -> list[Path]:
    """Writes ``loss.png`` (training loss per task and total, per epoch) and, when the history
    has validation metrics, ``metrics.png`` (one panel per task). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [row["epoch"] for row in history]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({k for row in history for k in row if k.startswith("train_loss/")}):
        ax.plot(
            epochs,
            [row.get(key, float("nan")) for row in history],
            marker="o",
            label=key.split("/", 1)[1],
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    metric_keys = sorted({k for row in history for k in row if k.startswith("val/")})
    tasks = sorted({k.split("/")[1] for k in metric_keys})
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for key in (k for k in metric_keys if k.split("/")[1] == task):
                ax.plot(
                    epochs,
                    [row.get(key, float("nan")) for row in history],
                    marker="o",
                    label=key.split("/")[2],
                )
            ax.set_title(task)
            ax.set_xlabel("epoch")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "metrics.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "metrics.png")
    return written


def save_heatmap(matrix, labels: Sequence[str], path: str | Path, title: str) -> Path:
    """A labelled heatmap PNG of a square matrix (values written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[float(v) for v in row] for row in matrix]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * n, 0.8 + 0.8 * n))
    image = ax.imshow(
        values,
        cmap="RdBu",
        vmin=-max(map(abs, functools.reduce(operator.iadd, values, []))) or -1,
        vmax=max(map(abs, functools.reduce(operator.iadd, values, []))) or 1,
    )
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{values[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
