"""Put LoRA into a model, freeze the rest, merge it into the weights and take it out again.

``apply_lora`` replaces each targeted module by a LoRA layer at the same path. Because the LoRA layer
owns the original ``weight``/``bias`` Parameters, the base state-dict keys do not change and the
frozen weights are shared, not copied. Everything is checked (``plan_lora``) before the first module
is replaced, so a refused call leaves the model untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.layers import LoraLayer, wrap_module
from lorakit.module_paths import is_plain_base_param, replace_module
from lorakit.modules_to_save import ModulesToSave
from lorakit.plan import LoraPlan, format_bytes, plan_lora, resolve_modules_to_save
from lorakit.state import has_lora, lora_state


def apply_lora(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default",
               ranks: dict[str, int] | None = None) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and return the model.

    The first adapter becomes active and trainable; later ones are added inactive and frozen, as PEFT's
    ``add_adapter`` does (``set_adapter`` activates one and lets only it train). ``ranks`` overrides
    the rank per module name (used when loading a file whose tensor shapes are the truth). Everything
    is checked first; should injecting still fail, the model is put back as it was.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise LoraError(f"adapter_name={adapter_name!r} must be a non-empty name without dots")
    if has_lora(model) and adapter_name in lora_state(model).configs:
        raise LoraError(f"adapter {adapter_name!r} already exists; pick another name or "
                        "delete_adapter(model, name) first")
    plan = plan_lora(model, cfg)                       # raises before anything changes
    cfg = plan.config                                  # target_modules=None, task heads: resolved
    saved = resolve_modules_to_save(model, cfg)
    flags = requires_grad_flags(model)
    try:
        _inject(model, cfg, adapter_name, plan, ranks or {})
        for name, _ in saved:
            wrapper = model.get_submodule(name)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                replace_module(model, name, wrapper)
            wrapper.add(adapter_name)
        state = lora_state(model, create=True)
        state.configs[adapter_name] = cfg
        state.trainable[adapter_name] = True
        if not state.active:
            activate(model, [adapter_name])
        else:               # as PEFT's add_adapter: frozen until set_adapter makes it active
            freeze_adapter(model, adapter_name)
    except Exception:
        take_back(model, adapter_name, flags)
        raise
    _guard_save_pretrained(model)
    _enable_input_grads(model)
    return model


def _guard_save_pretrained(model: nn.Module) -> None:
    """A Hugging Face model's ``save_pretrained`` would write the whole model with lorakit's internal
    keys, which ``from_pretrained`` silently drops (an untrained base, a re-initialised head). While the
    model has adapters it refuses instead, naming what to do; ``lorakit.hf.prepare_for_trainer`` swaps in
    a ``save_pretrained`` that writes the adapter folder. The class is untouched (an instance entry)."""
    if callable(getattr(type(model), "save_pretrained", None)) and "save_pretrained" not in model.__dict__:
        guard = functools.partial(_refuse_full_save, model)
        guard.lorakit_hook = True
        model.__dict__["save_pretrained"] = guard


def _refuse_full_save(model: nn.Module, *args, **kwargs):
    if not has_lora(model):
        return type(model).save_pretrained(model, *args, **kwargs)
    raise LoraError("save_pretrained on a model with lorakit adapters would write lorakit-internal keys "
                    "that from_pretrained silently drops. Save the adapter with lorakit.save_adapter("
                    "model, path) (PEFT's format), a plain merged model with lorakit.merge_and_unload("
                    "model).save_pretrained(path), or call lorakit.hf.prepare_for_trainer(model) once so "
                    "save_pretrained and Trainer checkpoints write the adapter folder")


def _enable_input_grads(model: nn.Module) -> None:
    """What PEFT's get_peft_model does for activation checkpointing: with reentrant checkpoints
    (``torch.utils.checkpoint(use_reentrant=True)``) a block whose inputs need no gradient gives outputs
    that need none, so the LoRA factors inside would get no gradient at all. transformers hooks only
    text models' token embeddings itself; here the input embedding of every Hugging Face (sub)model (a
    ViT's patch embedding, Whisper's first conv) makes its output require grad, while activation
    checkpointing is on and gradients are being recorded (so inference and torch.compile see no change).
    Plain torch models, which have no ``get_input_embeddings``, are left alone."""
    if "_lorakit_input_grads" in model.__dict__:
        return
    flags = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    handles, seen = [], set()
    for module in model.modules():
        if not (callable(getattr(module, "get_input_embeddings", None))
                and hasattr(module, "main_input_name")):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            continue
        if isinstance(embeddings, nn.Module) and id(embeddings) not in seen:
            seen.add(id(embeddings))
            handles.append(embeddings.register_forward_hook(
                functools.partial(_input_requires_grad, flags)))
    if handles:
        model.__dict__["_lorakit_input_grads"] = handles


def _input_requires_grad(flags: list, module, inputs, output) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point() \
            and not output.requires_grad and any(m.gradient_checkpointing for m in flags):
        output.requires_grad_(True)


def requires_grad_flags(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    return [(p, p.requires_grad) for p in model.parameters()]


def drop_head_copies(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``'s modules_to_save copies; a wrapper using one falls back to the original."""
    for _, wrapper in saved_module_wrappers(model):
        if name in wrapper.modules_to_save:
            del wrapper.modules_to_save[name]
        if wrapper.active == name:
            wrapper.active = None


def take_back(model: nn.Module, name: str, flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Undo a half-done ``apply_lora`` / ``load_adapter`` of adapter ``name``: its deltas and head copies
    go, wrappers it created go, bookkeeping and requires_grad flags are as recorded in ``flags``."""
    for _, layer in lora_layers(model):
        if name in layer.lora:
            del layer.lora[name]
        layer.set_active(layer.active_adapters)
    drop_head_copies(model, name)
    state = model.__dict__.get("_lorakit")
    if state is not None:
        state.configs.pop(name, None)
        state.trainable.pop(name, None)
        state.active = [n for n in state.active if n != name]
    remove_unused_wrappers(model)
    for p, flag in flags:
        p.requires_grad_(flag)


def freeze_adapter(model: nn.Module, name: str) -> None:
    """requires_grad = False for adapter ``name``'s own tensors (factors, DoRA magnitude, head copy)."""
    for _, layer in lora_layers(model):
        if name in layer.lora:
            layer.lora[name].requires_grad_(False)
    for _, wrapper in saved_module_wrappers(model):
        if name in wrapper.modules_to_save:
            wrapper.modules_to_save[name].requires_grad_(False)


def activate(model: nn.Module, names: list[str]) -> None:
    """Make ``names`` the active adapters of every layer and head wrapper, and let only them train.
    The checked public entry point is ``lorakit.set_adapter``."""
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, wrapper in saved_module_wrappers(model):
        wrapper.active = next((n for n in names if n in wrapper.modules_to_save), None)
    lora_state(model).active = list(names)
    refresh_trainable(model)


def _inject(model: nn.Module, cfg: LoraConfig, adapter_name: str, plan: LoraPlan,
            ranks: dict[str, int]) -> None:
    for target in plan.targets:
        layer = wrap_module(target.module, target.kind, target.fused_mask)
        if layer is not target.module:
            replace_module(model, target.name, layer)
        r = ranks.get(target.name, cfg.rank_for(target.name))
        layer.add_adapter(adapter_name, r, cfg.alpha_for(target.name), cfg.dropout, cfg.rslora,
                          cfg.init, dora=cfg.dora, lora_bias=cfg.lora_bias)


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
            for p in base_biases(model).values():
                p.requires_grad_(True)


def base_biases(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base model's own biases (what ``bias="all"`` trains): not LoRA's, not a head copy's."""
    return {name: p for name, p in model.named_parameters()
            if name.rpartition(".")[2] == "bias" and is_plain_base_param(name)}


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
        replace_module(model, name, plain_module(layer))
    for name, wrapper in saved_module_wrappers(model):
        replace_module(model, name, wrapper.in_use())
    forget_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Take every adapter out *without* merging (PEFT's ``unload``) and return the base model: each LoRA
    layer becomes the module it wrapped, each modules_to_save wrapper the original, untrained head.
    Merged adapters are subtracted first, so the weights are the base's again (up to the rounding bound
    in layers/base.py). Parameters stay frozen, as PEFT leaves them. The trained adapters are gone:
    ``save_adapter`` them first, or keep their effect with ``merge_and_unload``."""
    unmerge_lora(model)
    for name, layer in lora_layers(model):
        replace_module(model, name, plain_module(layer))
    for name, wrapper in saved_module_wrappers(model):
        replace_module(model, name, wrapper.original_module)
    forget_lora(model)
    return model


def plain_module(layer: LoraLayer) -> nn.Module:
    """The module ``layer`` wraps, holding the layer's (possibly merged) weight and bias Parameters."""
    base = layer.base_layer
    base.weight = layer.weight                     # the same Parameter object, merged or not
    if layer.bias is not None:
        base.bias = layer.bias
    return base


def remove_unused_wrappers(model: nn.Module) -> None:
    """Put the plain module back wherever no adapter is left (a LoRA layer without deltas, a head wrapper
    without copies); with no adapter left at all, drop lorakit's bookkeeping too."""
    for name, layer in lora_layers(model):
        if not len(layer.lora):
            replace_module(model, name, plain_module(layer))
    for name, wrapper in saved_module_wrappers(model):
        if not len(wrapper.modules_to_save):
            replace_module(model, name, wrapper.original_module)
    if not has_lora(model):
        forget_lora(model)


def forget_lora(model: nn.Module) -> None:
    """Remove lorakit's per-model state and the hooks apply_lora put on the model (save_pretrained,
    input gradients): the model is an ordinary torch module again."""
    model.__dict__.pop("_lorakit", None)
    if getattr(model.__dict__.get("save_pretrained"), "lorakit_hook", False):
        del model.__dict__["save_pretrained"]
    for handle in model.__dict__.pop("_lorakit_input_grads", []):
        handle.remove()


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


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-line report, in PEFT's words (``PeftModel.print_trainable_parameters``):
    ``trainable params: 1,843,200 || all params: 775,873,280 || trainable%: 0.2376``."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, as PEFT's ``get_nb_trainable_parameters``."""
    report = trainable_parameters(model)
    return report.trainable, report.total


def trainable_parameters(model: nn.Module) -> ParamReport:
    """Counts as in the Whisper gravitational-wave LoRA study (89M full / 3.4M LoRA / 2.32M frozen)."""
    params = list(model.parameters())
    return ParamReport(sum(p.numel() for p in params if p.requires_grad),
                       sum(p.numel() for p in params))


def _short(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
