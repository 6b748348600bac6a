"""Heads and the hard-parameter-sharing multi-task model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlcore.nn.conv import Conv2dAct

__all__ = ["DenseHead", "GroupedModel", "LinearHead", "MLPHead", "MultiTaskModel"]


class LinearHead(nn.Linear):
    """A linear head on the trunk's feature vector: ``[B, in_features] -> [B, num_outputs]``."""

    needs_feature_map = False

    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__(in_features, num_outputs)


class MLPHead(nn.Sequential):
    """A small MLP head: Linear - ReLU - (Dropout) - Linear on the feature vector."""

    needs_feature_map = False

    def __init__(
        self, in_features: int, num_outputs: int, hidden: int = 64, dropout: float = 0.0
    ) -> None:
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, num_outputs))
        super().__init__(*layers)


class DenseHead(nn.Module):
    """A per-pixel head on the trunk's feature map: a 3x3 conv + relu (fused), a 1x1 conv to
    ``num_outputs`` channels, and bilinear upsampling to ``output_size``:
    ``[B, in_channels, h, w] -> [B, num_outputs, H, W]``."""

    needs_feature_map = True

    def __init__(
        self,
        in_channels: int,
        num_outputs: int,
        output_size: int | tuple[int, int],
        hidden: int = 32,
    ) -> None:
        super().__init__()
        self.conv = Conv2dAct(in_channels, hidden, 3, padding=1, activation="relu")
        self.classifier = nn.Conv2d(hidden, num_outputs, 1)
        self.output_size = (
            (int(output_size), int(output_size))
            if isinstance(output_size, int)
            else tuple(int(v) for v in output_size)
        )

    def forward(self, feature_map: Tensor) -> Tensor:
        y = self.classifier(self.conv(feature_map))
        return F.interpolate(y, size=self.output_size, mode="bilinear", align_corners=False)


class MultiTaskModel(nn.Module):
    """Hard parameter sharing: one trunk, one head per task; returns ``{task: output}``.

    ``trunk(x)`` gives the feature vector the vector heads read. Heads with
    ``needs_feature_map = True`` (:class:`DenseHead`) read the trunk's feature map instead,
    which the trunk must provide through ``trunk.features(x) -> (feature_map, vector)``; it is
    computed once per forward. The same trunk with one head is the single-task baseline.
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("MultiTaskModel: needs at least one head")
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))
        self._map_heads = {
            k for k, h in self.heads.items() if getattr(h, "needs_feature_map", False)
        }
        if self._map_heads and not hasattr(trunk, "features"):
            raise ValueError(
                f"MultiTaskModel: heads {sorted(self._map_heads)} need a feature map, which "
                f"{type(trunk).__name__} does not provide (no features() method)"
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self._map_heads:
            feature_map, vector = self.trunk.features(x)
        else:
            feature_map, vector = None, self.trunk(x)
        return {
            name: head(feature_map if name in self._map_heads else vector)
            for name, head in self.heads.items()
        }

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The trunk's parameters (what gradient-based weighting methods balance)."""
        return list(self.trunk.parameters())


class GroupedModel(nn.Module):
    """Branched hard sharing: one trunk per group of tasks (e.g. from
    :func:`mtlcore.relations.group_tasks`), each with its group's heads; returns the union of
    the branches' outputs. ``trunk_factory()`` builds a fresh trunk per group."""

    def __init__(
        self,
        trunk_factory: Callable[[], nn.Module],
        heads: Mapping[str, nn.Module],
        groups: Sequence[Sequence[str]],
    ) -> None:
        super().__init__()
        names = [n for g in groups for n in g]
        if sorted(names) != sorted(heads) or len(names) != len(set(names)):
            raise ValueError(
                f"GroupedModel: groups {list(map(list, groups))} must hold every head "
                f"({sorted(heads)}) exactly once"
            )
        if any(len(g) == 0 for g in groups):
            raise ValueError("GroupedModel: groups must not be empty")
        self.groups = [list(g) for g in groups]
        self.branches = nn.ModuleList(
            MultiTaskModel(trunk_factory(), {n: heads[n] for n in g}) for g in groups
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for branch in self.branches:
            out.update(branch(x))
        return out
