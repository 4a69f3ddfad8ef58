"""Several named adapters on one model: a library of tasks to switch between (seed 002).

Switching only flips which adapters each LoRA layer adds in ``forward``; nothing is re-injected or
copied, so it costs microseconds. Merged adapters must be unmerged first, because switching a merged
model would silently keep the old delta in the weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import apply_lora, lora_layers, refresh_trainable, saved_module_wrappers
from lorakit.layers.linear import LoraLinear
from lorakit.state import check_adapter, lora_state


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> nn.Module:
    """Add another adapter (inactive until ``set_adapter``)."""
    return apply_lora(model, cfg, adapter_name=name)


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    return dict(lora_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(lora_state(model).active)


def set_adapter(model: nn.Module, names: str | list[str]) -> nn.Module:
    """Make ``names`` the active adapter(s); only they train. Several active adapters are summed."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_adapter(model, name)
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise LoraError("adapters are merged into the weights; call unmerge_lora(model) before "
                        "switching adapters")
    if len(names) > 1 and len(saved_module_wrappers(model)) and \
            any(lora_state(model).configs[n].modules_to_save for n in names):
        raise LoraError(f"adapters {names} each have their own modules_to_save head; only one of "
                        "them can be active at a time")
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, wrapper in saved_module_wrappers(model):
        wrapper.active = next((n for n in names if n in wrapper.modules_to_save), None)
    lora_state(model).active = names
    refresh_trainable(model)
    return model


def set_trainable(model: nn.Module, name: str, trainable: bool) -> nn.Module:
    """Allow (or stop) training adapter ``name`` when it is active."""
    check_adapter(model, name).trainable[name] = trainable
    refresh_trainable(model)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    state = check_adapter(model, name)
    for _, layer in lora_layers(model):
        if name in layer.merged_adapters:
            raise LoraError(f"adapter {name!r} is merged; call unmerge_lora(model) before deleting it")
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.delete_adapter(name)
    for _, wrapper in saved_module_wrappers(model):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
            if wrapper.active == name:
                wrapper.active = None
    del state.configs[name]
    state.trainable.pop(name, None)
    if name in state.active:
        state.active.remove(name)
    refresh_trainable(model)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """Run the bare base model inside the block (adapters and head copies off), then restore.

    A merged model is unmerged on entry and merged again on exit, so outputs inside are the base's.
    """
    from lorakit.inject import merge_lora, unmerge_lora
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [w for _, w in saved_module_wrappers(model)]
    was_merged = any(layer.merged_adapters for layer in layers)
    if was_merged:
        unmerge_lora(model)
    for module in layers + wrappers:
        module.disabled = True
    try:
        yield model
    finally:
        for module in layers + wrappers:
            module.disabled = False
        if was_merged:
            merge_lora(model)


def set_row_adapters(model: nn.Module, names: list[str | None] | None) -> nn.Module:
    """Serve a mixed batch: row i of every input goes through adapter ``names[i]`` (None = the bare
    base), in one gathered matmul per layer (layers/mixed.py), whatever the active adapter.
    ``names=None`` ends mixed mode. For inference: dropout is not applied, so a model in training mode
    whose adapters have dropout is refused; call ``model.eval()`` first."""
    layers = [layer for _, layer in lora_layers(model)]
    if names is None:
        for layer in layers:
            layer.row_adapters = None
        return model
    names = list(names)
    if not names:
        raise LoraError("names is empty; give one adapter name (or None for the base) per batch row")
    used = sorted({n for n in names if n is not None})
    state = lora_state(model)
    for name in used:
        check_adapter(model, name)
    if any(layer.merged_adapters for layer in layers):
        raise LoraError("adapters are merged into the weights; call unmerge_lora(model) before "
                        "serving mixed-adapter batches")
    unsupported = sorted({type(layer).__name__ for layer in layers if type(layer) is not LoraLinear
                          and any(n in layer.lora for n in used)})
    if unsupported:
        raise LoraError(f"mixed-adapter batches support LoraLinear layers only; adapters {used} also "
                        f"sit on {unsupported}. Target plain linear layers, or run one adapter at a "
                        "time with set_adapter")
    if len(saved_module_wrappers(model)) and any(state.configs[n].modules_to_save for n in used):
        raise LoraError(f"adapters {used} have their own modules_to_save heads, which cannot differ "
                        "per row; serve them one at a time with set_adapter")
    if model.training and any(state.configs[n].dropout > 0 for n in used):
        raise LoraError("mixed-adapter batches are for inference and skip dropout, but the model is in "
                        "training mode with LoRA dropout; call model.eval() first")
    slot = {name: i + 1 for i, name in enumerate(used)}
    index = torch.tensor([0 if n is None else slot[n] for n in names], dtype=torch.long)
    for layer in layers:
        layer.row_adapters = (tuple(used), index)
    return model


@contextmanager
def mixed_adapters(model: nn.Module, names: list[str | None]):
    """``with mixed_adapters(model, ["a", "b", None, ...]):`` one adapter per batch row inside the block."""
    set_row_adapters(model, names)
    try:
        yield model
    finally:
        set_row_adapters(model, None)
