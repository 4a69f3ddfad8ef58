"""LoRA on a linear map: ``nn.Linear``, or Hugging Face GPT-2's ``Conv1D`` (weight stored transposed).

    h = x W0^T + b + s * dropout(x) A^T B^T         x: (..., in), A: (r, in), B: (out, r)

``fan_in_fan_out`` is True for Conv1D, whose weight is (in, out); the low-rank factors keep the
nn.Linear layout either way, and only the merged delta is transposed to match the weight.

``forward`` picks one of three computations of the same formula:
  - fused (``layers/lora_function.py``): one active adapter, not merged or disabled, this exact class
    (subclasses such as DoRA change the math), outside ``torch.compile`` (Inductor fuses the eager graph
    itself). Switch it off with ``lorakit.layers.use_fused(False)``.
  - mixed (``layers/mixed.py``): a different adapter per batch row, set by ``lorakit.mixed_adapters``.
  - eager (``LoraLayer.forward`` with ``lora_forward`` below): the readable reference, used otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer, LowRankDelta
from lorakit.layers.lora_function import fused_enabled, fused_lora_linear
from lorakit.layers.mixed import mixed_lora_delta, stack_factors


class LoraLinear(LoraLayer):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    # (adapter names, (b,) slot per batch row; 0 = base) while a mixed-adapter batch is set, else None
    row_adapters: tuple | None = None

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = base.weight.shape
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapters or type(self) is not LoraLinear:
            return super().forward(x)
        if self.row_adapters is not None:
            names, index = self.row_adapters
            a_stack, b_stack = stack_factors(self.lora, names, self.in_features, self.out_features,
                                             x.device)
            out = self.base_forward(x)
            return out + mixed_lora_delta(x, a_stack, b_stack, index.to(x.device)).to(out.dtype)
        if len(self.active_adapters) == 1 and fused_enabled() and not torch.compiler.is_compiling():
            delta = self.lora[self.active_adapters[0]]
            p = delta.dropout.p if self.training and isinstance(delta.dropout, nn.Dropout) else 0.0
            return fused_lora_linear(x, self.weight, self.bias, delta.A, delta.B, delta.scale, p,
                                     self.fan_in_fan_out)
        return super().forward(x)

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
