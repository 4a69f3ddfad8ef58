"""LoRA on a linear map: ``nn.Linear``, or Hugging Face GPT-2's ``Conv1D`` (weight stored transposed).

    h = x W0^T + b + s * dropout(x) A^T B^T         x: (..., in), A: (r, in), B: (out, r)

``fan_in_fan_out`` is True for Conv1D, whose weight is (in, out); the low-rank factors keep the
nn.Linear layout either way, and only the merged delta is transposed to match the weight.

``forward`` picks one of three computations of the same formula:
  - fused (``layers/lora_function.py``) when ``takes_fused_path()``: one active adapter whose delta is
    plain LoRA (DoRA changes the math), a layer whose output is one addmm (not fused slices), outside
    ``torch.compile`` (Inductor fuses the eager graph itself), and not a bf16/fp16 training step of
    fewer than 512 rows, where it measured slower (the rule and its figures: lora_function.py).
    Switch it off with ``lorakit.layers.use_fused(False)``, force it with ``use_fused(True)``.
  - mixed (``layers/mixed.py``): a different adapter per batch row, set by ``lorakit.mixed_adapters``.
  - eager (``LoraLayer.forward`` with ``lora_forward`` below): the readable reference, used otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer, LowRankDelta, is_quantized
from lorakit.layers.dora import DoraDelta
from lorakit.layers.lora_function import (FUSED_MIN_ROWS_LOW_PRECISION, fused_enabled,
                                          fused_lora_linear, fused_mode)
from lorakit.layers.mixed import cached_stacks, mixed_lora_delta


class LoraLinear(LoraLayer):
    """Replaces an ``nn.Linear`` (or GPT-2 ``Conv1D`` with ``fan_in_fan_out=True``)."""

    # (adapter names, (b,) slot per batch row; 0 = base) while a mixed-adapter batch is set, else None
    row_adapters: tuple | None = None
    # The whole layer is x W^T + b + s B A x, so one fused autograd call (or one gathered mixed-batch
    # matmul) computes it; LoraFusedLinear, whose slices are separate products, sets these False.
    fused_kernel = True
    supports_row_adapters = True

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base)
        self.fan_in_fan_out = fan_in_fan_out
        rows, cols = base.weight.shape
        self.in_features, self.out_features = (rows, cols) if fan_in_fan_out else (cols, rows)

    def takes_fused_path(self, x: torch.Tensor | None = None) -> bool:
        """True when the fused autograd function computes exactly what the eager path would, and (by
        default, given the input ``x``) is not the slower one: a training step under bf16/fp16 with
        fewer than FUSED_MIN_ROWS_LOW_PRECISION rows goes eager (measured; lora_function.py)."""
        if not (self.fused_kernel and len(self.active_adapters) == 1 and fused_enabled()):
            return False
        if is_quantized(self.weight):     # eager: quantized_linear dequantizes once each way (quant/)
            return False
        delta = self.lora[self.active_adapters[0]]
        if not delta.is_plain or torch.compiler.is_compiling():
            return False
        if x is None or fused_mode() != "auto" or not torch.is_grad_enabled() or \
                x.numel() >= FUSED_MIN_ROWS_LOW_PRECISION * x.shape[-1]:
            return True
        low = torch.is_autocast_enabled(x.device.type) or self.weight.dtype in (torch.bfloat16,
                                                                               torch.float16)
        # dropout on: fused keeps no mask (less activation memory), worth its fixed cost
        return not low or (self.training and isinstance(delta.dropout, nn.Dropout))

    def delta_class(self, dora: bool) -> type[LowRankDelta]:
        return DoraDelta if dora else LowRankDelta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged_adapters or self.slot is not None:
            return super().forward(x)
        if self.row_adapters is not None and self.supports_row_adapters:
            names, index = self.row_adapters
            a_stack, b_stack = cached_stacks(self, names, x.device)
            out = self.base_forward(x)
            return out + mixed_lora_delta(x, a_stack, b_stack, index.to(x.device)).to(out.dtype)
        if self.takes_fused_path(x):
            delta = self.lora[self.active_adapters[0]]
            p = delta.dropout.p if self.training and isinstance(delta.dropout, nn.Dropout) else 0.0
            return fused_lora_linear(x, self.weight, self.bias, delta.A, delta.B, delta.scale, p,
                                     self.fan_in_fan_out)
        return super().forward(x)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.fan_in_fan_out else self.weight
        return F.linear(x, weight, self.bias)

    def low_rank(self, h: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        return F.linear(F.linear(h, delta.A), delta.B)

    def frozen_forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight.t() if self.fan_in_fan_out else self.weight)

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t() if self.fan_in_fan_out else weight

    def row_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1) if self.fan_in_fan_out else v.view(-1, 1)

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        dw = delta.scale * (delta.B.detach().float() @ delta.A.detach().float())
        return dw.t() if self.fan_in_fan_out else dw

    def factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def describe_base(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        return (f"{kind}(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")
