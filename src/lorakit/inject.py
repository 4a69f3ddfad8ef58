"""Put LoRA into a model, freeze the rest, merge it into the weights and take it out again.

``apply_lora`` replaces each targeted module by a LoRA layer at the same path. Because the LoRA layer
owns the original ``weight``/``bias`` Parameters, the base state-dict keys do not change and the
frozen weights are shared, not copied. Everything is checked (``plan_lora``) before the first module
is replaced, so a refused call leaves the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.layers import LoraLayer, wrap_module
from lorakit.modules_to_save import ModulesToSave
from lorakit.plan import LoraPlan, format_bytes, plan_lora, resolve_modules_to_save
from lorakit.state import has_lora, lora_state


def apply_lora(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default",
               ranks: dict[str, int] | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return the model.

    The first adapter becomes active and trainable; later ones are added inactive (switch with
    ``set_adapter``). ``ranks`` overrides the rank per module name (used when loading a file whose
    tensor shapes are the truth).
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LoraError(f"adapter_name={adapter_name!r} must be a non-empty name without dots")
    if has_lora(model) and adapter_name in lora_state(model).configs:
        raise LoraError(f"adapter {adapter_name!r} already exists; pick another name or "
                        "delete_adapter(model, name) first")
    plan = plan_lora(model, cfg)                       # raises before anything changes
    saved = resolve_modules_to_save(model, cfg)
    _inject(model, cfg, adapter_name, plan, ranks or {})
    for name, _ in saved:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            _replace(model, name, wrapper)
        wrapper.add(adapter_name)
    state = lora_state(model, create=True)
    state.configs[adapter_name] = cfg
    state.trainable[adapter_name] = True
    if not state.active:
        from lorakit.adapters import set_adapter
        set_adapter(model, adapter_name)
    return model


def _inject(model: nn.Module, cfg: LoraConfig, adapter_name: str, plan: LoraPlan,
            ranks: dict[str, int]) -> None:
    for target in plan.targets:
        layer = wrap_module(target.module, target.kind, target.fused_mask)
        if layer is not target.module:
            _replace(model, target.name, layer)
        r = ranks.get(target.name, cfg.rank_for(target.name))
        layer.add_adapter(adapter_name, r, cfg.alpha_for(target.name), cfg.dropout, cfg.rslora,
                          cfg.init)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module):
    """(name, layer) for every LoRA layer in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def saved_module_wrappers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSave)]


def refresh_trainable(model: nn.Module) -> None:
    """requires_grad = True exactly for the active adapters' factors, their modules_to_save copies and
    the biases their ``bias`` mode trains (unless loaded with trainable=False); False elsewhere."""
    state = lora_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in state.active:
        if not state.trainable.get(name, True):
            continue
        cfg = state.configs[name]
        for _, layer in lora_layers(model):
            if name in layer.lora:
                layer.lora[name].requires_grad_(True)      # A, B (and DoRA's magnitude)
                if cfg.bias == "lora_only" and layer.bias is not None:
                    layer.bias.requires_grad_(True)
        for _, wrapper in saved_module_wrappers(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
        if cfg.bias == "all":
            for pname, p in model.named_parameters():
                if pname.endswith("bias") and not any(
                        part in pname for part in (".lora.", "original_module.", "modules_to_save.")):
                    p.requires_grad_(True)


# --- merging --------------------------------------------------------------------------------------
def merge_lora(model: nn.Module, safe: bool = True) -> nn.Module:
    """W <- W + s B A for the active adapters, in every LoRA layer. Idempotent.

    With ``safe=True`` all factors are checked for NaN/inf first and each merged weight before it is
    written; if any layer refuses, the layers merged so far are unmerged again and LoraError is raised.
    """
    layers = lora_layers(model)
    if safe:
        for name, layer in layers:
            for adapter in layer.active_adapters:
                delta = layer.lora[adapter]
                if not (delta.A.isfinite().all() and delta.B.isfinite().all()):
                    raise LoraError(f"adapter {adapter!r} at {name!r} holds NaN/inf; refusing to merge "
                                    "(nothing was changed)")
    done = []
    try:
        for name, layer in layers:
            if not layer.merged_adapters:
                layer.merge(check_finite=safe)
                done.append(layer)
    except LoraError as err:
        for layer in done:
            layer.unmerge()
        raise LoraError(f"{name}: {err}") from None
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged delta again (exact up to the rounding bound in layers/base.py)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return plain torch modules: no LoRA code left at inference."""
    merge_lora(model)
    for name, layer in lora_layers(model):
        base = layer.base_layer
        base.weight = layer.weight                     # the merged weight, same Parameter object
        if layer.bias is not None:
            base.bias = layer.bias
        _replace(model, name, base)
    for name, wrapper in saved_module_wrappers(model):
        _replace(model, name, wrapper.in_use())
    model.__dict__.pop("_lorakit", None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --- reporting ------------------------------------------------------------------------------------
@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} ({_short(self.trainable)}) of {self.total:,} "
                f"({_short(self.total)}) = {self.pct:.3f}% | trainable fp32 size "
                f"{format_bytes(4 * self.trainable)}")


def trainable_parameters(model: nn.Module) -> ParamReport:
    """Counts like the seed's comparison (89M full / 3.4M LoRA / 2.32M frozen encoder)."""
    params = list(model.parameters())
    return ParamReport(sum(p.numel() for p in params if p.requires_grad),
                       sum(p.numel() for p in params))


def _short(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
