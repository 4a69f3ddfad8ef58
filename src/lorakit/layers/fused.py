"""LoRA on chosen slices of a fused projection (loralib's ``MergedLinear``), e.g. q and v of a qkv matrix.

The output of W0 (out = n * d) is n equal slices; ``mask`` says which get a low-rank update.
Each enabled slice j has its own rank-r pair (A_j: (r, in), B_j: (d, r)); disabled slices get none:

    h[:, slice_i] = (x W0^T + b)[:, slice_i] + s * dropout(x) A_j^T B_j^T   if mask[i] (j-th enabled)
    dW[slice_i]   = s * B_j A_j,   and 0 for disabled slices

Stored stacked: A = [A_1; ...; A_k] of shape (k r, in), B = [B_1; ...; B_k] of shape (k d, r).
The shared init (std 1/r, or kaiming with fan-in = in) draws each A_j as a separate layer would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers.base import LowRankDelta
from lorakit.layers.linear import LoraLinear


class LoraFusedLinear(LoraLinear):
    fused_kernel = False              # each slice is its own low-rank product: the eager path computes it
    supports_row_adapters = False

    def delta_class(self, dora: bool) -> type[LowRankDelta]:
        if dora:
            raise LoraError("DoRA on slices of a fused projection is not implemented; drop fused_slices "
                            "for this module or set dora=False")
        return LowRankDelta

    def __init__(self, base: nn.Module, mask: list[bool], fan_in_fan_out: bool = False):
        super().__init__(base, fan_in_fan_out)
        if self.out_features % len(mask):
            raise LoraError(f"fused_slices mask {mask} splits out_features={self.out_features} into "
                            f"{len(mask)} slices, which does not divide evenly")
        self.mask = list(mask)
        self.slice_size = self.out_features // len(mask)
        self.enabled = [i for i, on in enumerate(mask) if on]

    def factor_shapes(self, r: int):
        k = len(self.enabled)
        return (k * r, self.in_features), (k * self.slice_size, r)

    def _blocks(self, delta: LowRankDelta, a: torch.Tensor, b: torch.Tensor):
        k = len(self.enabled)
        return a.view(k, delta.r, -1), b.view(k, self.slice_size, delta.r)

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        _, b_blocks = self._blocks(delta, delta.A, delta.B)
        h = F.linear(delta.dropout(x).to(delta.A.dtype), delta.A)          # (..., k r)
        h = h.unflatten(-1, (len(self.enabled), delta.r))                  # (..., k, r)
        y = torch.einsum("...kr,kdr->...kd", h, b_blocks)                  # (..., k, d)
        pieces = list(y.unbind(-2))
        zero = y.new_zeros(y.shape[:-2] + (self.slice_size,))
        full = [pieces.pop(0) if on else zero for on in self.mask]
        return delta.scale * torch.cat(full, dim=-1)

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        a_blocks, b_blocks = self._blocks(delta, delta.A.detach().float(), delta.B.detach().float())
        dw = torch.zeros(self.out_features, self.in_features, device=delta.A.device)
        for j, i in enumerate(self.enabled):
            dw[i * self.slice_size:(i + 1) * self.slice_size] = b_blocks[j] @ a_blocks[j]
        dw = delta.scale * dw
        return dw.t() if self.fan_in_fan_out else dw

    def describe_base(self) -> str:
        return super().describe_base() + f", slices={self.mask}"
