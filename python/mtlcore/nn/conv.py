"""``Conv2dAct``: ``nn.Conv2d`` followed by an activation, as one fused op; ``fuse`` rewrites
models built from ``nn.Conv2d`` and activation modules to use it."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn

from mtlcore import ops

__all__ = ["Conv2dAct", "fuse"]


class Conv2dAct(nn.Conv2d):
    """``nn.Conv2d`` plus ``activation``, computed by :func:`mtlcore.ops.conv2d_act`.

    Same constructor, parameter names (``weight``, ``bias``) and initialisation as
    ``nn.Conv2d``, so an ``nn.Conv2d`` state_dict loads into it and back. Only
    ``padding_mode="zeros"`` is supported. ``activation`` is one of
    :data:`mtlcore.ops.ACTIVATIONS`; ``negative_slope`` is leaky_relu's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation: str = "relu",
        negative_slope: float = 0.01,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"Conv2dAct supports padding_mode='zeros' only, got {padding_mode!r}")
        ops.check_activation(activation)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        return ops.conv2d_act(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.activation,
            self.negative_slope,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", activation={self.activation}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s


def _activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(activation, negative_slope) of a supported activation module, else None."""
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if isinstance(module, nn.SiLU):
        return "silu", 0.0
    if isinstance(module, nn.Sigmoid):
        return "sigmoid", 0.0
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0
    return None


def _fused(conv: nn.Conv2d, activation: str, negative_slope: float) -> Conv2dAct:
    fused = Conv2dAct(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        device="meta",
        activation=activation,
        negative_slope=negative_slope,
    )
    fused.weight = conv.weight
    fused.bias = conv.bias
    fused.train(conv.training)
    return fused


def fuse(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every ``nn.Conv2d`` directly followed, inside an
    ``nn.Sequential``, by a supported activation module (ReLU, LeakyReLU, GELU, SiLU, Sigmoid,
    Tanh) is one :class:`Conv2dAct`.

    The activation's slot becomes ``nn.Identity()``, so module names and the state_dict keys
    stay those of ``model`` (its state_dict loads into the fused model and back). The copy
    holds copies of the weights; ``model`` itself is not changed. Convolutions with a padding
    mode other than zeros are left alone.
    """
    fused_model = copy.deepcopy(model)
    for seq in fused_model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for name, next_name in itertools.pairwise(names):
            conv, act = seq._modules[name], seq._modules[next_name]
            found = _activation_of(act) if act is not None else None
            if found is None or type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
                continue
            seq._modules[name] = _fused(conv, *found)
            seq._modules[next_name] = nn.Identity()
    return fused_model
