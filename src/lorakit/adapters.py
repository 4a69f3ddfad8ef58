"""Several named adapters on one model: a library of tasks to switch between (LoraHub, Huang et al. 2023).

Switching only flips which adapters each LoRA layer adds in ``forward``; nothing is re-injected or
copied, so it costs microseconds. Merged adapters must be unmerged first, because switching a merged
model would silently keep the old delta in the weights.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import (activate, apply_lora, drop_head_copies, lora_layers, merge_lora,
                            refresh_trainable, remove_unused_wrappers, saved_module_wrappers,
                            unmerge_lora)
from lorakit.layers.slot import SwitchSlot, slot_refusal
from lorakit.state import check_adapter, has_lora, lora_state


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> nn.Module:
    """Add another adapter (inactive until ``set_adapter``)."""
    return apply_lora(model, cfg, adapter_name=name)


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    """{name: config} of the model's adapters ({} for a model without any)."""
    return dict(lora_state(model).configs) if has_lora(model) else {}


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters' names ([] for a model without any)."""
    return list(lora_state(model).active) if has_lora(model) else []


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
    _check_slots(model, names)
    activate(model, names)
    return model


def prepare_compiled_switching(model: nn.Module, max_rank: int | None = None) -> nn.Module:
    """Let ``set_adapter`` switch adapters under ``torch.compile`` without recompiling (layers/slot.py):
    each LoRA layer computes from fixed tensors of rank ``max_rank`` (default: the largest adapter rank
    on the model) that ``set_adapter`` refills in place. For inference; call it before compiling.
    ``end_compiled_switching`` goes back to the ordinary per-adapter forward."""
    layers = lora_layers(model)
    if not layers:
        raise LoraError("the model has no LoRA layers; apply_lora or load_adapter first")
    refused = {name: why for name, layer in layers for why in [slot_refusal(layer)] if why}
    if refused:
        raise LoraError(f"compiled switching holds plain LoRA only; {len(refused)} layers have other "
                        f"kinds, e.g. {dict(list(refused.items())[:3])}")
    r_max = max_rank or max(d.r for _, layer in layers for d in layer.lora.values())
    if isinstance(r_max, bool) or not isinstance(r_max, int) or r_max < 1:
        raise LoraError(f"max_rank={max_rank!r} must be a positive integer")
    _check_slots(model, active_adapters(model), r_max)
    for _, layer in layers:
        layer.slot = SwitchSlot(layer, r_max)
        layer.slot.fill(layer, layer.active_adapters)
    return model


def end_compiled_switching(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.slot = None
    return model


def _check_slots(model: nn.Module, names: list[str], r_max: int | None = None) -> None:
    """Refuse before switching when a layer's slot could not hold ``names`` (too much rank, DoRA)."""
    for path, layer in lora_layers(model):
        size = r_max or (layer.slot.r if layer.slot is not None else None)
        if size is None:
            continue
        why = slot_refusal(layer)
        need = sum(layer.lora[n].r for n in names if n in layer.lora)
        if why or need > size:
            raise LoraError(f"{path}: adapters {names} need rank {need} ({why or 'plain LoRA'}); the "
                            f"compiled-switching slot holds plain LoRA of rank {size}. Call "
                            f"prepare_compiled_switching(model, max_rank={max(need, 1)}) again, or "
                            "end_compiled_switching(model)")


def set_trainable(model: nn.Module, name: str, trainable: bool) -> nn.Module:
    """Allow (or stop) training adapter ``name`` when it is active."""
    check_adapter(model, name).trainable[name] = trainable
    refresh_trainable(model)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name``: its factors, DoRA magnitudes and head copies.

    Deleting an *active* adapter follows PEFT: the other active adapters stay active; if none is left
    active, the first remaining adapter becomes the active one, with a warning; if no adapter is left at
    all, the model is its plain base model again (as after ``unload``), with a warning. A layer or head
    that no remaining adapter uses is given back as the plain module it wrapped.
    """
    state = check_adapter(model, name)
    for _, layer in lora_layers(model):
        if name in layer.merged_adapters:
            raise LoraError(f"adapter {name!r} is merged; call unmerge_lora(model) before deleting it")
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.delete_adapter(name)
    drop_head_copies(model, name)
    del state.configs[name]
    state.trainable.pop(name, None)
    still_active = [n for n in state.active if n != name]
    remove_unused_wrappers(model)
    if not state.configs:
        warnings.warn(f"adapter {name!r} was deleted and no adapter is left: the model is the plain "
                      "base model again (parameters stay frozen)", stacklevel=2)
        return model
    if name in state.active and not still_active:
        still_active = [next(iter(state.configs))]
        warnings.warn(f"adapter {name!r} was active and is deleted; the active adapter is now "
                      f"{still_active[0]!r} (the first remaining one, as in PEFT); choose another with "
                      "set_adapter(model, name)", stacklevel=2)
    activate(model, still_active)
    return model


@contextmanager
def disable_adapter(model: nn.Module):
    """Run the bare base model inside the block (adapters and head copies off), then restore.

    A merged model is unmerged on entry and merged again on exit, so outputs inside are the base's.
    """
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
    unsupported = sorted({_row_kind(layer, n) for layer in layers for n in used if n in layer.lora
                          and not (getattr(layer, "supports_row_adapters", False)
                                   and layer.lora[n].is_plain)})
    if unsupported:
        raise LoraError(f"mixed-adapter batches support plain LoRA on linear layers only; adapters "
                        f"{used} also sit on {unsupported}. Target plain linear layers, or run one "
                        "adapter at a time with set_adapter")
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


def _row_kind(layer, name: str) -> str:
    return "DoRA" if not layer.lora[name].is_plain else type(layer).__name__


@contextmanager
def mixed_adapters(model: nn.Module, names: list[str | None]):
    """``with mixed_adapters(model, ["a", "b", None, ...]):`` one adapter per batch row inside the block."""
    set_row_adapters(model, names)
    try:
        yield model
    finally:
        set_row_adapters(model, None)
