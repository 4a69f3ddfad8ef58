"""LoRA on a linear map: ``nn.Linear``, or Hugging Face GPT-2's ``Conv1D`` (weight stored transposed).

    h = x W0^T + b + s * dropout(x) A^T B^T         x: (..., in), A: (r, in), B: (out, r)

``fan_in_fan_out`` is True for Conv1D, whose weight is (in, out); the low-rank factors keep the
nn.Linear layout either way, and only the merged delta is transposed to match the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer, LowRankDelta


class LoraLinear(LoraLayer):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = base.weight.shape
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias)

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        h = delta.dropout(x).to(delta.A.dtype)
        return delta.scale * F.linear(F.linear(h, delta.A), delta.B)

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        dw = delta.scale * (delta.B.detach().float() @ delta.A.detach().float())
        return dw.t() if self.fan_in_fan_out else dw

    def factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def describe_base(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (f"{kind}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")
