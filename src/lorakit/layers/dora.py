"""DoRA (Liu et al. 2024): weight-decomposed LoRA. A learnt magnitude per output feature times a direction.

    W' = m * (W0 + s B A) / ||W0 + s B A||_c          m: (out,), ||.||_c: L2 norm over the input dim,
                                                       one value per output feature (PEFT's convention)
    h  = W' x + b

``m`` starts at ||W0||_c and B at 0, so the layer equals the base at init. As in the paper (section 4.3)
and PEFT, the norm is treated as a constant: it is computed from detached factors and gets no gradient.
The forward is written the way PEFT's ``DoraLinearLayer`` computes it, so outputs agree to fp32 rounding:

    base = W0 x  (= layer output - b)
    h    = W0 x + b + (m / n - 1) * base + (m / n) * s * B A x,        n = ||W0 + s (B A).detach()||_c

The magnitude lives on the adapter's LowRankDelta (``lora.<name>.magnitude``) next to A and B, so it trains,
is switched and deleted with them. One DoRA adapter is active per layer at a time (a second one would need
PEFT's order-dependent stacking, which is not implemented).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers.base import LoraLayer, LowRankDelta
from lorakit.layers.linear import LoraLinear


class DoraLinear(LoraLinear):
    """A LoraLinear whose adapters carry a magnitude vector. Overrides ``forward``, ``merge``, ``unmerge``."""

    def add_magnitude(self, name: str) -> None:
        """Give adapter ``name`` its magnitude m = ||W0 + s B A||_c (= ||W0||_c while B = 0)."""
        delta = self.lora[name]
        with torch.no_grad():
            norm = self.weight_norm(delta)
        delta.magnitude = nn.Parameter(norm.clone(), requires_grad=delta.A.requires_grad)

    def weight_norm(self, delta: LowRankDelta) -> torch.Tensor:
        """||W0 + s B A||_c in fp32, shape (out,), without gradient (the paper's 'treated as constant')."""
        weight = self.weight.detach().float()
        weight = weight.t() if self.fan_in_fan_out else weight        # (out, in)
        lora = delta.B.detach().float() @ delta.A.detach().float()
        return torch.linalg.norm(weight + delta.scale * lora, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.disabled or self.merged_adapters:
            return out
        active = [n for n in self.active_adapters if n in self.lora]
        if len(active) > 1:
            raise LoraError(f"DoRA layer has {len(active)} active adapters {active}; activate one at a "
                            "time (set_adapter(model, name))")
        for name in active:
            delta = self.lora[name]
            if getattr(delta, "magnitude", None) is None:          # a plain LoRA adapter on this layer
                out = out + self.lora_forward(x, delta).to(out.dtype)
                continue
            factor = (delta.magnitude / self.weight_norm(delta)).view(1, -1)       # (1, out)
            if isinstance(delta.dropout, nn.Identity) or not self.training:
                base = out if self.bias is None else out - self.bias
                h = x
            else:                                  # PEFT: with active dropout the base term sees it too
                h = delta.dropout(x)
                base = F.linear(h, self.weight.t() if self.fan_in_fan_out else self.weight)
            h = h.to(delta.A.dtype)
            lora = F.linear(F.linear(h, delta.A), delta.B)
            out = out + ((factor - 1) * base + factor * lora * delta.scale).to(out.dtype)
        return out

    # --- merging: W <- m / n * (W0 + s B A), exactly the forward's weight -------------------------------
    def merge(self, check_finite: bool = True) -> None:
        todo = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not todo:
            return
        if getattr(self.lora[todo[0]], "magnitude", None) is None:
            return super().merge(check_finite)
        if len(todo) > 1 or self.merged_adapters:
            raise LoraError(f"DoRA layer: cannot merge adapters {todo} on top of {self.merged_adapters}; "
                            "merge one DoRA adapter at a time")
        delta = self.lora[todo[0]]
        norm = self.weight_norm(delta)
        factor = (delta.magnitude.detach().float() / norm).view(-1, 1)          # (out, 1)
        factor = factor.t() if self.fan_in_fan_out else factor
        merged = (factor * (self.weight.detach().float() + self.delta_weight(delta))).to(self.weight.dtype)
        if check_finite and not torch.isfinite(merged).all():
            raise LoraError(f"merging {todo} gives non-finite weights; the adapter has NaN/inf or "
                            "overflows the weight dtype. Nothing was merged")
        with torch.no_grad():
            self.weight.copy_(merged)
        self._merge_factor = factor               # n depends on W0; keep it to undo the merge
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """W0 = W' / (m / n) - s B A, up to two roundings (as LoraLayer.unmerge)."""
        if not self.merged_adapters:
            return
        delta = self.lora[self.merged_adapters[0]]
        if getattr(delta, "magnitude", None) is None:
            return super().unmerge()
        restored = self.weight.detach().float() / self._merge_factor - self.delta_weight(delta)
        with torch.no_grad():
            self.weight.copy_(restored.to(self.weight.dtype))
        self.merged_adapters = []

    def describe_base(self) -> str:
        return "DoRA " + super().describe_base()


def to_dora(model: nn.Module, adapter_name: str) -> list[str]:
    """Turn every plain LoraLinear holding ``adapter_name`` into a DoraLinear (same Parameters, same
    adapters) and give the adapter its magnitude. Returns the converted module paths.

    Refuses (before changing anything) layers that are not plain linear maps: DoRA on embeddings,
    convolutions and fused slices is not implemented."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora]
    bad = [f"{n} ({type(m).__name__})" for n, m in layers
           if type(m) not in (LoraLinear, DoraLinear)]
    if bad:
        raise LoraError(f"DoRA supports Linear / GPT-2 Conv1D targets only; these are not: {bad}. "
                        "Drop them from the target modules")
    merged = [n for n, m in layers if m.merged_adapters]
    if merged:
        raise LoraError(f"{merged} are merged; unmerge_lora(model) before converting to DoRA")
    for path, layer in layers:
        if type(layer) is LoraLinear:
            dora = DoraLinear.__new__(DoraLinear)
            dora.__dict__.update(layer.__dict__)     # same weight, bias, lora dict and flags; no copy
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dora)
            layer = dora
        layer.add_magnitude(adapter_name)
    return [p for p, _ in layers]
