"""What every method is told (``AdaptSpec``), and plain LoRA, which the LoRA variants build on."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import apply_lora


@dataclass
class AdaptSpec:
    head: list[str]                                    # module names trained by every method
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    extra: dict = field(default_factory=dict)         # method-specific knobs (e.g. lora_plus_ratio)


def lora_config(spec: AdaptSpec, **changes) -> LoraConfig:
    """The LoraConfig of ``spec``'s LoRA: its targets, rank, alpha, dropout, scale; the head trains."""
    fields = dict(r=spec.r, alpha=spec.alpha, target_modules=spec.lora_targets, dropout=spec.dropout,
                  rslora=spec.rslora, modules_to_save=spec.head)
    return LoraConfig(**{**fields, **changes})


def apply_plain_lora(model: nn.Module, spec: AdaptSpec, **changes) -> nn.Module:
    """``lora``: LoRA on the task's targets plus the head (``changes`` override LoraConfig fields)."""
    return apply_lora(model, lora_config(spec, **changes))
