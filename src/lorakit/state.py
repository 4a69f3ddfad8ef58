"""Per-model bookkeeping: which adapters exist, their configs, which is active, which may train.

Kept on the model object itself (``model._lorakit``) because apply_lora works in place and returns
the user's own model rather than a wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError


@dataclass
class LoraState:
    configs: dict[str, LoraConfig] = field(default_factory=dict)
    trainable: dict[str, bool] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def lora_state(model: nn.Module, create: bool = False) -> LoraState:
    state = model.__dict__.get("_lorakit")
    if state is None:
        if not create:
            raise LoraError("this model has no LoRA adapters; call lorakit.apply_lora(model, cfg) "
                            "or lorakit.load_adapter(model, path) first")
        state = model.__dict__["_lorakit"] = LoraState()
    return state


def has_lora(model: nn.Module) -> bool:
    state = model.__dict__.get("_lorakit")
    return state is not None and bool(state.configs)


def check_adapter(model: nn.Module, name: str) -> LoraState:
    state = lora_state(model)
    if name not in state.configs:
        raise LoraError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    return state
