"""Switching adapters under ``torch.compile`` without recompiling: the active factors in fixed tensors.

A compiled graph guards on Python state: which adapter names a layer has active, which ``lora[name]``
module it reads. Switching adapters changes both, so every switch recompiles (and after 8 variants
dynamo gives up and runs eager). With a slot, the layer's forward reads two fixed tensors instead,

    A_slot: (r_max, ...) = [A_1; A_2; ...; 0]        B_slot: (out, r_max, ...) = [s_1 B_1, s_2 B_2, ..., 0]
    h = base(x) + low_rank(x; A_slot, B_slot) = base(x) + sum_i s_i B_i A_i x

and ``set_adapter`` copies the new active adapters' factors into them in place (zero padded up to
r_max), which changes no guard: one compilation serves every adapter (PEFT's compiled hot-swap does the
same). Slots are for inference: they are buffers (no gradient), copies taken at switch time (call
``set_adapter`` again after changing a factor), and hold plain LoRA only (no DoRA / lora_bias, no fused
slices, no grouped convolutions). ``lorakit.prepare_compiled_switching`` sets them up.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LoraError


class SwitchSlot(nn.Module):
    """Fixed (A, s B) tensors of rank ``r_max`` a LoRA layer computes with while switching compiled."""

    def __init__(self, layer, r_max: int):
        super().__init__()
        a_shape, b_shape = layer.factor_shapes(r_max)
        device = layer.weight.device
        self.register_buffer("A", torch.zeros(a_shape, device=device), persistent=False)
        self.register_buffer("B", torch.zeros(b_shape, device=device), persistent=False)
        self.r = r_max

    def fill(self, layer, names: list[str]) -> None:
        """[A_1; A_2; ...] and [s_1 B_1, s_2 B_2, ...] of the active adapters, zero after; in place."""
        need = sum(layer.lora[n].r for n in names)
        if need > self.r:
            raise LoraError(f"adapters {names} need rank {need} on {layer.describe_base()}, more than the "
                            f"switching slot's {self.r}; call prepare_compiled_switching(model, "
                            f"max_rank={need}) again (one recompilation)")
        with torch.no_grad():
            self.A.zero_()
            self.B.zero_()
            start = 0
            for name in names:
                delta = layer.lora[name]
                self.A[start:start + delta.r].copy_(delta.A)
                self.B[:, start:start + delta.r].copy_(delta.B * delta.scale)
                start += delta.r

    def output(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.low_rank(x.to(self.A.dtype) if x.is_floating_point() else x, self)


def slot_refusal(layer) -> str | None:
    """Why ``layer`` cannot compute from a switching slot, or None."""
    if getattr(layer, "mask", None) is not None:
        return "fused slices"
    if getattr(layer, "groups", 1) > 1:
        return "a grouped convolution"
    odd = [n for n, d in layer.lora.items() if not d.is_plain]
    return f"adapters {odd} that are not plain LoRA (DoRA / lora_bias)" if odd else None
