"""What every LoRA layer shares: the named low-rank deltas, which are active, and merging.

A LoRA layer *replaces* the module it adapts at the same path and takes over that module's ``weight`` and
``bias`` Parameters (the same objects, no copy), so the base model's state-dict keys stay as they were
(``...query.weight``). The adapters live under ``lora.<name>.A`` / ``lora.<name>.B``.

Merging adds s * dW to the frozen weight in place; dW is computed in fp32 even for bf16/fp16 weights and
the sum is rounded once to the weight's dtype. Unmerging subtracts the same fp32 delta and rounds again,
so the restored weight differs from the original by at most the two roundings, elementwise

    |W_restored - W| <= u * (|W + s dW| + |W|) <= u * (2 |W| + |s dW|),

with u the unit roundoff of the weight's dtype (2^-24 fp32, 2^-8 bf16, 2^-11 fp16). In fp32 with a
small delta this is a few ulps of W; ``tests/test_merge.py`` checks the bound.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import LoraError


class LowRankDelta(nn.Module):
    """One adapter's factors: dW = scale * B @ A, of rank at most ``r``.

    Shapes depend on the layer (Linear: A (r, in), B (out, r); Conv: A (r, in, *kernel),
    B (out, r, 1, ...); Embedding: A (r, num_embeddings), B (dim, r)). Factors are kept in fp32
    whatever the base dtype, so small updates are not lost to bf16 rounding.
    """

    def __init__(self, a_shape, b_shape, r: int, alpha: float, dropout: float, rslora: bool,
                 device=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(a_shape, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=torch.float32))
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


class LoraLayer(nn.Module):
    """Base for LoRA layers. Subclasses define how the base op and the low-rank path are computed.

    Subclass contract:
      ``base_forward(x)``            the frozen layer's own output
      ``lora_forward(x, delta)``     s * (B A) applied to x, without the base term
      ``delta_weight(delta)``        s * dW shaped like ``self.weight``, in fp32
      ``factor_shapes(r)``           (A shape, B shape) for rank r
      ``init_factors(delta, init)``  fill A and B so that dW = 0
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        # The wrapped module is kept unregistered (not a submodule) so its parameters are not
        # listed twice; merge_and_unload hands it back with our (possibly merged) weight.
        self.__dict__["base_layer"] = base
        self.weight = base.weight
        self.register_parameter("bias", getattr(base, "bias", None))
        self.lora = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.disabled or self.merged_adapters:
            return out
        for name in self.active_adapters:
            out = out + self.lora_forward(x, self.lora[name]).to(out.dtype)
        return out

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool,
                    init: str) -> LowRankDelta:
        if name in self.lora:
            raise LoraError(f"adapter {name!r} already exists on this layer; delete it first or "
                            "pick another name")
        a_shape, b_shape = self.factor_shapes(r)
        delta = LowRankDelta(a_shape, b_shape, r, alpha, dropout, rslora, device=self.weight.device)
        self.init_factors(delta, init)
        self.lora[name] = delta
        return delta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LoraError(f"adapter {name!r} is merged; unmerge_lora(model) before deleting it")
        del self.lora[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.lora]

    # --- merging ------------------------------------------------------------------------------
    def merge(self, check_finite: bool = True) -> None:
        """W <- W + sum_active s dW, once per adapter (a second call is a no-op)."""
        todo = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not todo:
            return
        total = sum(self.delta_weight(self.lora[n]) for n in todo)
        merged = (self.weight.detach().float() + total).to(self.weight.dtype)
        if check_finite and not torch.isfinite(merged).all():
            raise LoraError(f"merging {todo} gives non-finite weights; the adapter has NaN/inf or "
                            "overflows the weight dtype. Nothing was merged")
        with torch.no_grad():
            self.weight.copy_(merged)
        self.merged_adapters.extend(todo)

    def unmerge(self) -> None:
        """W <- W - sum_merged s dW, restoring the base weight up to the bound in the module doc."""
        if not self.merged_adapters:
            return
        total = sum(self.delta_weight(self.lora[n]) for n in self.merged_adapters)
        with torch.no_grad():
            self.weight.copy_((self.weight.float() - total).to(self.weight.dtype))
        self.merged_adapters = []

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{n}{'*' if n in self.active_adapters else ''}{' merged' if n in self.merged_adapters else ''}"
            for n in self.lora)
        return f"{self.describe_base()}, adapters=[{adapters}] (* = active)"

    def describe_base(self) -> str:
        return f"weight={tuple(self.weight.shape)}"

    # --- subclass hooks -----------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        raise NotImplementedError

    def factor_shapes(self, r: int) -> tuple[tuple, tuple]:
        raise NotImplementedError

    def init_factors(self, delta: LowRankDelta, init: str) -> None:
        init_a_random_b_zero(delta, init)


def init_a_random_b_zero(delta: LowRankDelta, init: str) -> None:
    """A random, B = 0, so s B A = 0 at the start. Gaussian std is 1/r (PEFT's 'gaussian');
    kaiming is uniform with a = sqrt(5), the init nn.Linear gives its own weight (loralib, PEFT)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(delta.A, std=1.0 / delta.r)
        else:
            nn.init.kaiming_uniform_(delta.A, a=math.sqrt(5))
        nn.init.zeros_(delta.B)
