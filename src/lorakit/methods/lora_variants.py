"""Thin LoRA variants: same layers and file format as ``lora``, a different scale, init or learning rate.

    rslora     scale s = alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023): the update keeps its
               size as r grows
    pissa      A, B start at the top-r singular triplets of W0 (Meng et al. 2024), and the frozen weight
               becomes the residual, so the model still equals the base at step 0 (PEFT's convention):
                   W0 = V S U^T,   A = (S_r / s)^1/2 U_r^T  (r, in),   B = V_r (S_r / s)^1/2  (out, r)
                   W_res = W0 - s B A
    lora-plus  B factors train at lr * ratio (Hayou et al. 2024; ratio 16 by default,
               ``AdaptSpec.extra["lora_plus_ratio"]``), A at lr

PiSSA's residual base is recorded on each adapter as a weight offset (W_res = W0 + s (-B0) A0, see
io/save.py), so ``save_adapter`` writes a plain rank-2r LoRA against the *untouched* W0 ([B, -B0], [A; A0],
PEFT's PiSSA-to-LoRA conversion) that loads in lorakit and PEFT onto the original base model.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.inject import lora_layers
from lorakit.layers import LoraLinear
from lorakit.methods.hooks import TrainHooks
from lorakit.methods.spec import apply_plain_lora

DEFAULT_LORA_PLUS_RATIO = 16.0


def apply_rslora(model: nn.Module, spec) -> nn.Module:
    return apply_plain_lora(model, spec, rslora=True)


# --- PiSSA ------------------------------------------------------------------------------------------
def apply_pissa(model: nn.Module, spec) -> nn.Module:
    model = apply_plain_lora(model, spec)
    layers = [(n, l) for n, l in lora_layers(model) if "default" in l.lora]
    bad = [n for n, l in layers if type(l) is not LoraLinear]
    if bad:
        raise LoraError(f"pissa initialises Linear / GPT-2 Conv1D layers only; not {bad}")
    for _, layer in layers:
        pissa_init(layer, layer.lora["default"])
    return model


def pissa_init(layer: LoraLinear, delta) -> None:
    """A, B from the top-r SVD of W0 (fp32); W0 <- W0 - s B A; record the offset (-B, A)."""
    weight = layer.weight.detach().float()
    weight = weight.t() if layer.fan_in_fan_out else weight              # (out, in)
    v, s, uh = torch.linalg.svd(weight, full_matrices=False)
    root = (s[:delta.r] / delta.scale).sqrt()
    a, b = root[:, None] * uh[:delta.r], v[:, :delta.r] * root[None, :]
    residual = weight - delta.scale * (b @ a)
    with torch.no_grad():
        delta.A.copy_(a), delta.B.copy_(b)
        layer.weight.copy_((residual.t() if layer.fan_in_fan_out else residual).to(layer.weight.dtype))
    add_weight_offset(delta, a, -b)


def add_weight_offset(delta, a: torch.Tensor, b: torch.Tensor) -> None:
    """Record that the layer's frozen weight moved by s * b @ a (a: (k, in), b: (out, k)); offsets add up.
    Buffers, not parameters: they never train, and travel with ``.to(device)``."""
    a, b = a.detach().float().clone(), b.detach().float().clone()
    if delta.offset_A is not None:
        a, b = torch.cat([delta.offset_A, a]), torch.cat([delta.offset_B, b], dim=1)
    delta.register_buffer("offset_A", a)
    delta.register_buffer("offset_B", b)


# --- LoRA+ ------------------------------------------------------------------------------------------
class LoraPlusHooks(TrainHooks):
    """Moves the B factors into their own optimizer group at lr * ratio."""

    def __init__(self, b_factors: list[nn.Parameter], ratio: float):
        self.b_ids, self.ratio = {id(p) for p in b_factors}, ratio

    def param_groups(self, model, settings, groups):
        out = []
        for group in groups:
            rest = [p for p in group["params"] if id(p) not in self.b_ids]
            b = [p for p in group["params"] if id(p) in self.b_ids]
            out += [{**group, "params": rest}] if rest else []
            out += [{**group, "params": b, "lr": group["lr"] * self.ratio}] if b else []
        return out


def apply_lora_plus(model: nn.Module, spec) -> nn.Module:
    ratio = float(spec.extra.get("lora_plus_ratio", DEFAULT_LORA_PLUS_RATIO))
    if not ratio > 0:
        raise LoraError(f"lora_plus_ratio={ratio!r} must be positive (the paper uses 2 to 32; default "
                        f"{DEFAULT_LORA_PLUS_RATIO:g})")
    model = apply_plain_lora(model, spec)
    model.train_hooks = LoraPlusHooks([l.lora["default"].B for _, l in lora_layers(model)], ratio)
    return model
