"""DoRA (Liu et al. 2024): weight-decomposed LoRA. A learnt magnitude per output feature times a direction.

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          m: (out,), ||.||_c: L2 norm over the input dim,
                                                       one value per output feature (PEFT's convention)
    h  = W' x + b

``m`` starts at ||W0||_c and B at 0, so the layer equals the base at init. As in the paper (section 4.3)
and PEFT, the norm is treated as a constant: it is computed from detached factors and gets no gradient.
The forward is written the way PEFT's ``DoraLinearLayer`` computes it, so outputs agree to fp32 rounding:

    base = W0 x  (= layer output - b)
    h    = W0 x + b + (m / n - 1) * base + (m / n) * s * B A x,        n = ||W0 + s (B A).detach()||_c

The same formula serves every layer type, with "output feature" read per layer (PEFT's layouts):

    Linear / GPT-2 Conv1D   n: norm of each row of W (out, in)            m: (out,)
    Embedding               n: norm of each column of W (num, dim)        m: (dim,); no dropout
    Conv1d/2d/3d            n: norm of each W[o] over (in, *kernel)       m: (1, out, 1, ...)
    grouped Conv            as Conv, with PEFT's s (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)
                            as the delta inside the norm (not the true delta, which a grouped weight
                            cannot hold; kept so PEFT's files mean the same here)

``DoraDelta`` is the per-adapter object a LoRA layer builds for ``LoraConfig(dora=True)``: the
magnitude lives next to A and B (``lora.<name>.magnitude``), so it trains, switches and is deleted with
them. One DoRA adapter is active per layer at a time (a second would need PEFT's order-dependent
stacking, which is not implemented).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers.base import LoraLayer, LowRankDelta


class DoraDelta(LowRankDelta):
    """A LoRA delta with DoRA's magnitude (shaped as PEFT stores it: ``layer.channel_view``)."""

    is_plain = False

    def start(self, layer: LoraLayer) -> None:
        """m = ||W0 + s B A||_c (= ||W0||_c while B = 0)."""
        with torch.no_grad():
            norm = weight_norm(layer, self)
        self.magnitude = nn.Parameter(layer.channel_view(norm).clone(),
                                      requires_grad=self.A.requires_grad)

    def factor(self, layer: LoraLayer) -> torch.Tensor:
        """m / n per output channel, (k,), in fp32."""
        return self.magnitude.reshape(-1).float() / weight_norm(layer, self)

    def output(self, layer: LoraLayer, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if len(layer.active_adapters) > 1:
            raise LoraError(f"DoRA layer has {len(layer.active_adapters)} active adapters "
                            f"{layer.active_adapters}; activate one at a time (set_adapter(model, name))")
        factor = layer.channel_view(self.factor(layer))
        if isinstance(self.dropout, nn.Identity) or not layer.training or not layer.dropout_on_input:
            base = out if layer.bias is None else out - layer.channel_view(layer.bias)
            h = x
        else:                                      # PEFT: with active dropout the base term sees it too
            h = self.dropout(x)
            base = layer.frozen_forward(h)
        lora = layer.low_rank(h.to(self.A.dtype) if h.is_floating_point() else h, self)
        return (factor - 1) * base + factor * lora * self.scale

    # --- merging: W <- m / n * (W0 + s B A), exactly the forward's weight ---------------------------
    def check_merge(self, layer: LoraLayer, todo: list[str]) -> None:
        super().check_merge(layer, todo)
        if len(todo) > 1 or layer.merged_adapters:
            raise LoraError(f"DoRA layer: cannot merge adapters {todo} on top of "
                            f"{layer.merged_adapters}; merge one DoRA adapter at a time")

    def merge_into(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():              # n depends on W0, which merging overwrites: keep m / n
            self.merge_factor = layer.row_view(self.factor(layer))
        return self.merge_factor * (weight + layer.delta_weight(self))

    def unmerge_from(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """W0 = W' / (m / n) - s B A, up to two roundings (as LoraLayer.unmerge)."""
        restored = weight / self.merge_factor - layer.delta_weight(self)
        self.merge_factor = None
        return restored


def weight_norm(layer: LoraLayer, delta: LowRankDelta) -> torch.Tensor:
    """||W0 + s dW||_c in fp32, one value per output channel (k,), without gradient (the paper's
    "treated as constant")."""
    weight = layer.weight.detach().float()
    return torch.linalg.norm(layer.weight_rows(weight + layer.dora_delta(delta)), dim=1)
