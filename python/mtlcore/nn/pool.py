"""``MaxPool2d``: ``nn.MaxPool2d`` on :func:`mtlcore.ops.max_pool2d`."""

from __future__ import annotations

from torch import Tensor, nn

from mtlcore import ops

__all__ = ["MaxPool2d"]


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed by :func:`mtlcore.ops.max_pool2d`: the same constructor,
    attributes and results (values and gradients), without ``return_indices`` (the backward
    finds each window's maximum again instead of keeping indices).

    A drop-in replacement: ``isinstance(m, nn.MaxPool2d)`` holds and the module has no
    parameters or buffers, so state_dicts are unaffected.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        return_indices: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        if return_indices:
            raise ValueError("mtlcore.nn.MaxPool2d does not support return_indices=True")
        super().__init__(kernel_size, stride, padding, dilation, False, ceil_mode)

    def forward(self, input: Tensor) -> Tensor:
        return ops.max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode
        )
