"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (zero padding; grouped too), PEFT's layout.

    h = conv(x, W0, groups=g) + b + s * conv1x1(conv(dropout(x), A), B, groups=g)
    A: (r, in, *kernel) with the base's stride/padding/dilation, B: (out, r / g, 1, ...)

With g = 1 the 1x1 conv with B is linear per position, so conv1x1(conv(x, A), B) == conv(x, B A)
exactly and merging is exact math (up to float rounding):
    dW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...]
With g > 1 (PEFT's grouped LoRA, r divisible by g) A still reads every input channel, a change no
grouped weight (out, in / g, ...) can hold: such an adapter runs unmerged, and merging is refused.
DoRA (layers/dora.py) learns one magnitude per output channel, stored (1, out, 1, ...) as PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers.base import LoraLayer, LowRankDelta
from lorakit.layers.dora import DoraDelta

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class LoraConv(LoraLayer):
    def __init__(self, base: nn.modules.conv._ConvNd):
        if base.padding_mode != "zeros" or base.transposed:
            raise LoraError(f"LoRA supports plain convolutions (padding_mode='zeros', not transposed); "
                            f"got {base}")
        super().__init__(base)
        self.spatial = base.weight.dim() - 2
        self.conv = _CONV_FN[self.spatial]
        self.geometry = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        self.groups = base.groups
        self.out_channels = base.weight.shape[0]
        self.in_channels = base.weight.shape[1] * base.groups
        self.kernel_size = tuple(base.weight.shape[2:])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias, groups=self.groups, **self.geometry)

    def frozen_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(h, self.weight, None, groups=self.groups, **self.geometry)

    def low_rank(self, h: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        return self.conv(self.conv(h, delta.A, None, **self.geometry), delta.B, groups=self.groups)

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        if self.groups > 1:
            raise LoraError(self.merge_refusal())
        a = delta.A.detach().float().flatten(1)            # (r, in * prod(kernel))
        b = delta.B.detach().float().flatten(1)            # (out, r)
        return delta.scale * (b @ a).view(self.weight.shape)

    def dora_delta(self, delta: LowRankDelta) -> torch.Tensor:
        """PEFT's s (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape): the true delta when g = 1."""
        b = delta.B.detach().float().reshape(-1, delta.r)
        a = delta.A.detach().float().reshape(delta.r, -1)
        return delta.scale * (b @ a).reshape(self.weight.shape)

    def merge_refusal(self) -> str | None:
        if self.groups == 1:
            return None
        return (f"LoRA on {self.describe_base()}: A mixes all input channels, which a grouped weight "
                "cannot hold, so it cannot be merged (PEFT cannot either); keep it unmerged")

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1, *(1,) * self.spatial)

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def row_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *(1,) * (self.spatial + 1))

    def factor_shapes(self, r: int):
        if r % self.groups:
            raise LoraError(f"LoRA on {self.describe_base()} needs a rank divisible by groups="
                            f"{self.groups} (B is a grouped 1x1 conv, as in PEFT); r={r}")
        ones = (1,) * self.spatial
        return (r, self.in_channels, *self.kernel_size), (self.out_channels, r // self.groups, *ones)

    def delta_class(self, dora: bool) -> type[LowRankDelta]:
        return DoraDelta if dora else LowRankDelta

    def describe_base(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (f"Conv{self.spatial}d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}{groups})")
