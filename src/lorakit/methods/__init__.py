"""Adaptation methods by name: how a pretrained model is made trainable for a task.

    full    every parameter trains (the baseline LoRA is measured against)
    frozen  the pretrained body is frozen; only the task head trains
    lora    LoRA on the task's target matrices (the paper: attention q, v), plus the head

Each method takes the model and an AdaptSpec and returns the model, ready for the training loop.
Issue 4's family (bitfit, ia3, adapters, prefix, dora, ...) registers here under its own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import apply_lora


@dataclass
class AdaptSpec:
    head: list[str]                                    # module names trained by every method
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False


def _full(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    model.requires_grad_(True)
    return model


def _frozen(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    model.requires_grad_(False)
    for name in spec.head:
        model.get_submodule(name).requires_grad_(True)
    return model


def _lora(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    cfg = LoraConfig(r=spec.r, alpha=spec.alpha, target_modules=spec.lora_targets,
                     dropout=spec.dropout, rslora=spec.rslora, modules_to_save=spec.head)
    return apply_lora(model, cfg)


METHODS = {"full": _full, "frozen": _frozen, "lora": _lora}


def apply_method(model: nn.Module, method: str, spec: AdaptSpec) -> nn.Module:
    if method not in METHODS:
        raise LoraError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    model = METHODS[method](model, spec)
    model.head_modules = list(spec.head)       # the training loop gives these TrainSettings.head_lr
    return model
