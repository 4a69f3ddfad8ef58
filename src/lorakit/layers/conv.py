"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (groups = 1, zero padding).

    h = conv(x, W0) + b + s * conv1x1(conv(dropout(x), A), B)
    A: (r, in, *kernel) with the base's stride/padding/dilation, B: (out, r, 1, ...)
    dW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]

Because the 1x1 conv with B is linear per position, conv1x1(conv(x, A), B) == conv(x, B A) exactly,
so merging is exact math (up to float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers.base import LoraLayer, LowRankDelta

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    def __init__(self, base: nn.modules.conv._ConvNd):
        if base.groups != 1 or base.padding_mode != "zeros" or base.transposed:
            raise LoraError(f"LoRA supports plain convolutions (groups=1, padding_mode='zeros'); "
                            f"got {base}")
        super().__init__(base)
        self.spatial = base.weight.dim() - 2
        self.conv = _CONV_FN[self.spatial]
        self.geometry = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        self.out_channels, self.in_channels = base.weight.shape[:2]
        self.kernel_size = tuple(base.weight.shape[2:])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias, **self.geometry)

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        h = self.conv(delta.dropout(x).to(delta.A.dtype), delta.A, None, **self.geometry)
        return delta.scale * self.conv(h, delta.B)

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        a = delta.A.detach().float().flatten(1)            # (r, in * prod(kernel))
        b = delta.B.detach().float().flatten(1)            # (out, r)
        return delta.scale * (b @ a).view(self.weight.shape)

    def factor_shapes(self, r: int):
        ones = (1,) * self.spatial
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r, *ones)

    def describe_base(self) -> str:
        return (f"Conv{self.spatial}d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size})")
