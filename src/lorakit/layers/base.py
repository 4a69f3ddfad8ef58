"""What every LoRA layer shares: the named low-rank deltas, which are active, and merging.

A LoRA layer *replaces* the module it adapts at the same path and takes over that module's ``weight`` and
``bias`` Parameters (the same objects, no copy), so the base model's state-dict keys stay as they were
(``...query.weight``). The adapters live under ``lora.<name>.A`` / ``lora.<name>.B``.

Merging adds s * dW to the frozen weight in place; dW is computed in fp32 even for bf16/fp16 weights and
the sum is rounded once to the weight's dtype. Unmerging subtracts the same fp32 delta and rounds again,
so the restored weight differs from the original by at most the two roundings, elementwise

    |W_restored - W| <= u * (|W + s dW| + |W|) <= u * (2 |W| + |s dW|),

with u the unit roundoff of the weight's dtype (2^-24 fp32, 2^-8 bf16, 2^-11 fp16). In fp32 with a
small delta this is a few ulps of W; ``tests/test_layers.py`` checks the bound.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from lorakit.errors import LoraError


def is_quantized(weight) -> bool:
    """True for a frozen weight stored quantized (``lorakit.quant``'s NF4/int8 ``QuantizedWeight``).

    The core never imports ``lorakit.quant``: it recognises such a weight by its ``lorakit_quantized``
    marker and its ``dequantize(dtype)`` method. ``F.linear`` works on it unchanged; merging swaps in a
    dense copy (``LoraLayer.merge``) because the quantized storage cannot hold W + s dW.
    """
    return getattr(weight, "lorakit_quantized", False) is True


def fp32_math(method):
    """Run ``method`` with autocast off: a merge inside ``torch.autocast(bf16)`` would otherwise form
    B @ A in bf16 and break the fp32 rounding bound of the module docstring."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.autocast(self.weight.device.type, enabled=False):
            return method(self, *args, **kwargs)
    return wrapper


class LowRankDelta(nn.Module):
    """One adapter's factors on one layer: dW = scale * B @ A, of rank at most ``r``.

    Shapes depend on the layer (Linear: A (r, in), B (out, r); Conv: A (r, in, *kernel),
    B (out, r / groups, 1, ...); Embedding: A (r, num_embeddings), B (dim, r)). Factors are kept in
    fp32 whatever the base dtype, so small updates are not lost to bf16 rounding: ``model.half()`` /
    ``.bfloat16()`` / ``.to(dtype)`` cast the base and leave them fp32 (``_apply`` below); device moves
    apply as usual.

    Per-adapter extras, declared here and None unless a method sets them:
      magnitude      DoRA's learnt norm per output feature, (out,): set by ``DoraDelta`` (layers/dora.py)
      offset_A/B     a change already folded into the frozen weight, W = W_original + s offset_B offset_A
                     (PiSSA's residual, ReLoRA's merges); buffers, exported by ``save_adapter``
      merge_factor   DoRA: m / ||W0 + s B A||_c at merge time, kept so unmerge can divide it out
      B_bias         PEFT's lora_bias: a bias on B, (out,), so the adapter adds s (B A x + b_B)

    A plain delta adds ``s B A x`` to the layer's output; a variant (DoRA) is a subclass chosen when the
    adapter is added (``LoraLayer.add_adapter(dora=True)``) that overrides ``output`` and the merge pair.
    """

    is_plain = True        # output is exactly s B A x: the fused kernel and mixed batches may compute it

    def __init__(self, a_shape, b_shape, r: int, alpha: float, dropout: float, rslora: bool,
                 device=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(a_shape, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=torch.float32))
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = self.alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.magnitude: nn.Parameter | None = None
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)
        self.merge_factor: torch.Tensor | None = None
        self.B_bias: nn.Parameter | None = None

    def _apply(self, fn, recurse=True):
        """Apply ``fn`` (a device move, a cast) but keep floating tensors fp32: a cast to half precision
        is undone from the fp32 originals (moved to the new device), so no value is rounded."""
        kept = {name: t.data for name, t in [*self._parameters.items(), *self._buffers.items()]
                if t is not None and t.dtype == torch.float32}
        super()._apply(fn, recurse)
        for name, t in [*self._parameters.items(), *self._buffers.items()]:
            if name in kept and t.dtype != torch.float32:
                t.data = kept[name].to(t.device)
                if getattr(t, "grad", None) is not None:
                    t.grad = t.grad.float()
        return self

    def start(self, layer: "LoraLayer") -> None:
        """Called once the factors are initialised; variants derive their extra state here."""

    def output(self, layer: "LoraLayer", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What this adapter adds to the layer's output ``out`` (= base output so far): s B A x,
        plus s b_B with lora_bias."""
        y = layer.lora_forward(x, self)
        return y if self.B_bias is None else y + self.scale * layer.channel_view(self.B_bias)

    def check_merge(self, layer: "LoraLayer", todo: list[str]) -> None:
        """Raise LoraError if merging ``todo`` (which includes this adapter) cannot be exact."""
        refusal = layer.merge_refusal()
        if refusal is not None:
            raise LoraError(refusal)
        if self.B_bias is not None and layer.bias is None:
            raise LoraError(f"{layer.describe_base()} has no bias to fold lora_bias into, so this adapter "
                            "cannot be merged (PEFT cannot either); keep it unmerged")

    def merge_into(self, layer: "LoraLayer", weight: torch.Tensor) -> torch.Tensor:
        """The fp32 weight with this adapter folded in: W + s dW."""
        return weight + layer.delta_weight(self)

    def unmerge_from(self, layer: "LoraLayer", weight: torch.Tensor) -> torch.Tensor:
        """The inverse of ``merge_into``: W - s dW."""
        return weight - layer.delta_weight(self)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}"


class LoraLayer(nn.Module):
    """Base for LoRA layers. Subclasses define how the base op and the low-rank path are computed.

    Subclass contract:
      ``base_forward(x)``            the frozen layer's own output
      ``low_rank(h, delta)``         B A applied to h (no dropout, no scale)
      ``lora_forward(x, delta)``     s * B A dropout(x), without the base term (from low_rank)
      ``delta_weight(delta)``        s * dW shaped like ``self.weight``, in fp32
      ``factor_shapes(r)``           (A shape, B shape) for rank r
      ``init_factors(delta, init)``  fill A and B so that dW = 0
    The output channels (DoRA's magnitudes, lora_bias) are the last axis of the output and the rows of
    the weight here; layers that differ override ``channel_view``, ``weight_rows``, ``row_view``.
    """

    dropout_on_input = True        # Embedding: token ids get no dropout (as in PEFT)

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
        self.slot = None                   # a SwitchSlot while switching under torch.compile (slot.py)
        self.train(base.training)          # an eval-mode model gets LoRA layers in eval mode too

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.disabled or self.merged_adapters:
            return out
        if self.slot is not None:          # fixed tensors: switching adapters changes no compile guard
            return out + self.slot.output(self, x).to(out.dtype)
        for name in self.active_adapters:
            out = out + self.lora[name].output(self, x, out).to(out.dtype)
        return out

    # --- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, rslora: bool,
                    init: str, dora: bool = False, lora_bias: bool = False) -> LowRankDelta:
        if name in self.lora:
            raise LoraError(f"adapter {name!r} already exists on this layer; delete it first or "
                            "pick another name")
        delta_class = self.delta_class(dora)
        a_shape, b_shape = self.factor_shapes(r)
        delta = delta_class(a_shape, b_shape, r, alpha, dropout, rslora, device=self.weight.device)
        self.init_factors(delta, init)
        if lora_bias:                      # PEFT's lora_bias: zero at init, so still dW = 0
            delta.B_bias = nn.Parameter(torch.zeros(b_shape[0], device=self.weight.device))
            delta.is_plain = False
        delta.start(self)
        delta.train(self.training)
        self.lora[name] = delta
        return delta

    def delta_class(self, dora: bool) -> type[LowRankDelta]:
        """The per-adapter object this layer builds: plain LoRA, or DoRA where a subclass allows it."""
        if dora:
            raise LoraError(f"DoRA is not implemented for {self.describe_base()}; drop this module from "
                            "the targets or set dora=False")
        return LowRankDelta

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LoraError(f"adapter {name!r} is merged; unmerge_lora(model) before deleting it")
        del self.lora[name]
        if name in self.active_adapters:
            self.active_adapters.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.lora]
        if self.slot is not None:
            self.slot.fill(self, self.active_adapters)

    # --- merging ------------------------------------------------------------------------------
    @fp32_math
    def merge(self, check_finite: bool = True) -> None:
        """W <- W + sum_active s dW, once per adapter (a second call is a no-op). The sum is formed in
        fp32 and rounded to the weight's dtype once; variants fold in their own way (``merge_into``)."""
        todo = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not todo:
            return
        for name in todo:
            self.lora[name].check_merge(self, todo)
        merged = self.weight.dequantize(torch.float32) if is_quantized(self.weight) else \
            self.weight.detach().float()
        for name in todo:
            merged = self.lora[name].merge_into(self, merged)
        merged = merged.to(self.weight.dtype)
        bias = self.bias_after(todo, +1)
        if check_finite and not (torch.isfinite(merged).all() and
                                 (bias is None or torch.isfinite(bias).all())):
            raise LoraError(f"merging {todo} gives non-finite weights; the adapter has NaN/inf or "
                            "overflows the weight dtype. Nothing was merged")
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        if is_quantized(self.weight):
            # A 4/8-bit weight cannot hold W + s dW exactly: hold a dense dequant(Wq) + s dW in the
            # weight's dtype instead and keep Wq aside, so unmerge puts the very same Wq back.
            self.__dict__["quantized_weight"] = self.weight
            self.weight = nn.Parameter(merged, requires_grad=False)
        else:
            with torch.no_grad():
                self.weight.copy_(merged)
        self.merged_adapters.extend(todo)

    @fp32_math
    def unmerge(self) -> None:
        """W <- W - sum_merged s dW, restoring the base weight up to the bound in the module doc."""
        if not self.merged_adapters:
            return
        bias = self.bias_after(self.merged_adapters, -1)
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        quantized = self.__dict__.pop("quantized_weight", None)
        if quantized is not None:          # merged over a quantized weight: exact, Wq itself comes back
            self.weight = quantized
            self.merged_adapters = []
            return
        restored = self.weight.detach().float()
        for name in reversed(self.merged_adapters):
            restored = self.lora[name].unmerge_from(self, restored)
        with torch.no_grad():
            self.weight.copy_(restored.to(self.weight.dtype))
        self.merged_adapters = []

    def bias_after(self, names: list[str], sign: int) -> torch.Tensor | None:
        """The bias with sign * s b_B of ``names``' lora_bias folded in (fp32 sum, rounded once), or
        None when none of them has one."""
        biases = [self.lora[n].scale * self.lora[n].B_bias.detach().float() for n in names
                  if self.lora[n].B_bias is not None]
        if not biases:
            return None
        return (self.bias.detach().float() + sign * sum(biases)).to(self.bias.dtype)

    def merge_refusal(self) -> str | None:
        """Why this layer's adapters cannot be folded into its weight, or None when they can."""
        return None

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

    def low_rank(self, h: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        raise NotImplementedError

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        return delta.scale * self.low_rank(delta.dropout(x).to(delta.A.dtype), delta)

    def frozen_forward(self, h: torch.Tensor) -> torch.Tensor:
        """The frozen weight applied to ``h`` without the bias (DoRA's base term under dropout)."""
        raise NotImplementedError

    def channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """A value per output channel, (k,), shaped to broadcast on the layer's output."""
        return v

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as (k, n): one row per output channel (DoRA's norm is over each row)."""
        return weight

    def row_view(self, v: torch.Tensor) -> torch.Tensor:
        """A value per output channel, (k,), shaped to broadcast on the weight."""
        return v.view(-1, 1)

    def dora_delta(self, delta: LowRankDelta) -> torch.Tensor:
        """The s dW DoRA normalises with (the true delta; grouped convolutions follow PEFT)."""
        return self.delta_weight(delta)

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
