"""Ready-made trunks built from mtlcore's fused modules."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mtlcore.nn.conv import Conv2dAct
from mtlcore.nn.pool import MaxPool2d

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """The trunk of the classic Keras CIFAR-10 example: conv32 - relu - maxpool - conv64 -
    relu - maxpool - flatten - dense128 - relu, with each conv + relu one fused
    :class:`~mtlcore.nn.Conv2dAct` (3x3, padding 1) and each 2x2 max-pool
    :class:`~mtlcore.nn.MaxPool2d`.

    ``forward(x) -> [B, 128]``; ``features(x) -> (feature map [B, 64, H/4, W/4], vector)`` for
    per-pixel heads. ``fused=False`` builds the same network from ``nn.Conv2d`` + ``nn.ReLU``
    + ``nn.MaxPool2d`` (the plain-PyTorch baseline; same parameter names, so state_dicts move
    between the two).
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, features: int = 128, fused: bool = True
    ) -> None:
        super().__init__()
        if image_size % 4 != 0 or image_size < 4:
            raise ValueError(f"SmallCNN: image_size must be a multiple of 4, got {image_size}")

        def conv(cin: int, cout: int) -> nn.Module:
            if fused:
                return Conv2dAct(cin, cout, 3, padding=1, activation="relu")
            return nn.Conv2d(cin, cout, 3, padding=1)

        self.fused = fused
        self.conv1 = conv(in_channels, 32)
        self.conv2 = conv(32, 64)
        self.pool = MaxPool2d(2) if fused else nn.MaxPool2d(2)
        side = image_size // 4
        self.fc = nn.Linear(64 * side * side, features)
        self.map_channels = 64
        self.out_features = features

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        act = (lambda t: t) if self.fused else F.relu  # Conv2dAct applies relu itself
        feature_map = self.pool(act(self.conv2(self.pool(act(self.conv1(x))))))
        return feature_map, F.relu(self.fc(feature_map.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[1]
