"""Reading an adapter saved by lorakit or PEFT, and loading it onto a model.

Loading checks everything (paths, config, keys, shapes) before it touches the model (``io/checks.py``),
so a refused load leaves the model as it was. Only safetensors is read: a pickle (``.bin``/``.pt``) can
run code when unpickled, so it is refused, never opened.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lorakit.adapters import set_trainable
from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import apply_lora, lora_layers, requires_grad_flags, take_back
from lorakit.io.checks import (check_head_tensors, check_lora_tensors,
                               check_stored_base_weights, check_values)
from lorakit.io.files import adapter_dir
from lorakit.io.names import CONFIG_NAME, META_KEY, WEIGHTS_NAME
from lorakit.io.peft_format import TRAINING_ONLY_KEYS, config_from_peft, group_keys, strip_prefix
from lorakit.io.save import adapter_tensors
from lorakit.module_paths import matches_module
from lorakit.state import check_adapter, has_lora, lora_state
from lorakit.targeting import candidate_modules


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """Config, tensors (keys without the ``base_model.model.`` prefix) and lorakit metadata."""
    folder = adapter_dir(Path(path))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        _refuse_link_out(folder, name)
    try:
        raw = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise LoraError(f"{folder} has no {CONFIG_NAME}; point load_adapter at the folder "
                        "save_adapter (or PEFT's save_pretrained) wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(f"{folder / CONFIG_NAME} is not valid JSON ({err}); the file is damaged")
    if not isinstance(raw, dict):
        raise LoraError(f"{folder / CONFIG_NAME} must hold a JSON object, got {type(raw).__name__}")
    try:
        cfg = config_from_peft(raw)
    except TypeError as err:
        raise LoraError(f"{folder / CONFIG_NAME} has a field of the wrong type ({err})") from None
    tensors, meta = _read_weights(folder, lambda handle: (
        {strip_prefix(k): handle.get_tensor(k) for k in handle.keys()}, _record(handle)))
    for option, suffix in TRAINING_ONLY_KEYS.items():
        if raw.get(option):
            tensors = {k: v for k, v in tensors.items() if not k.endswith(suffix)}
    return cfg, tensors, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """lorakit's record in a saved adapter's safetensors metadata (base shapes, fingerprint, the
    quantized base of a QLoRA adapter); reads the file's header only, no tensor. {} when absent."""
    folder = adapter_dir(Path(path))
    _refuse_link_out(folder, WEIGHTS_NAME)
    meta = _read_weights(folder, _record)
    return meta if isinstance(meta, dict) else {}


def _read_weights(folder: Path, read):
    """``read(handle)`` on the adapter's safetensors file, a damaged file refused by name."""
    try:
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
            return read(handle)
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{folder / WEIGHTS_NAME} is corrupt or truncated ({err}); save it again")


def _record(handle):
    """lorakit's JSON record in the safetensors header ({} when the file has none)."""
    return json.loads((handle.metadata() or {}).get(META_KEY, "{}"))


def set_adapter_weights(model: nn.Module, path: str | os.PathLike,
                        adapter_name: str = "default") -> nn.Module:
    """Copy a saved adapter's tensors into the model's adapter ``adapter_name`` in place (PEFT's
    ``set_peft_model_state_dict``): the Parameters keep their identity, so an optimizer holding them
    keeps working, and their values become the file's, bit for bit. The file must hold exactly this
    adapter's tensors (same modules, same shapes); everything is checked before anything is copied.
    Resuming a Trainer run uses it (``lorakit.hf``)."""
    _, tensors, _ = read_adapter(path)
    check_values(tensors, path)
    check_adapter(model, adapter_name)
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.lora]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise LoraError(f"adapter {adapter_name!r} is merged; unmerge_lora(model) before loading weights")
    if any(layer.lora[adapter_name].offset_A is not None for layer in layers):
        raise LoraError(f"adapter {adapter_name!r} records a weight offset (PiSSA / ReLoRA): its file "
                        "holds the combined factors, which cannot be copied back in place; use "
                        "load_adapter on the untouched base instead")
    live = adapter_tensors(model, adapter_name)
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    shapes = [k for k in live if k in tensors and live[k].shape != tensors[k].shape]
    if missing or unexpected or shapes:
        raise LoraError(f"{path} is not a save of adapter {adapter_name!r} of this model: missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}. "
                        "Nothing was changed")
    with torch.no_grad():
        for key, value in live.items():
            value.copy_(tensors[key])
    return model


def _refuse_link_out(folder: Path, name: str) -> None:
    """A file of the adapter that is a symlink leading out of its folder is refused before it is read:
    a folder handed over (a download, an upload to a server) must not make lorakit read elsewhere."""
    target = (folder / name).resolve()
    if (folder / name).is_symlink() and not target.is_relative_to(folder.resolve()):
        raise LoraError(f"{folder / name} is a symlink to {target}, outside the adapter folder {folder}; "
                        "lorakit reads adapter files only from inside the folder (copy the file in "
                        "if you trust it)")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load an adapter saved by lorakit or PEFT onto ``model`` (in place; returns it).

    ``trainable=False`` (default) loads it for inference; ``trainable=True`` to continue training it.
    The adapter becomes active if it is the model's first.
    """
    cfg, tensors, meta = read_adapter(path)
    if has_lora(model) and adapter_name in lora_state(model).configs:
        raise LoraError(f"the model already has an adapter named {adapter_name!r}; pass another "
                        "adapter_name or delete_adapter first")
    cfg = _heads_in_model(model, cfg)
    groups, extra = group_keys(tensors)
    fused = meta.get("fused_slices", {})
    check_values(tensors, path)
    extra = check_stored_base_weights(model, extra, path)
    ranks = check_lora_tensors(model, cfg, groups, meta.get("base_shapes", {}), fused, path)
    heads = check_head_tensors(model, cfg, extra, path)
    exact = "|".join(re.escape(p) for p in groups)
    inject_cfg = LoraConfig(**{**cfg.to_dict(), "target_modules": f"(?:{exact})",
                               "exclude_modules": None, "layers_to_transform": None,
                               "fused_slices": fused, "strict": True, "task_type": None})
    flags = requires_grad_flags(model)
    apply_lora(model, inject_cfg, adapter_name, ranks=ranks)
    try:
        _copy_in(model, adapter_name, replace(cfg, **meta.get("config", {})), groups, heads, extra)
        return set_trainable(model, adapter_name, trainable)
    except Exception:
        take_back(model, adapter_name, flags)        # a refused load leaves the model as it was
        raise


def _copy_in(model: nn.Module, adapter_name: str, cfg: LoraConfig, groups: dict, heads: dict,
             extra: dict) -> None:
    """The file's tensors into the adapter apply_lora just made (same shapes, checked before)."""
    lora_state(model).configs[adapter_name] = cfg
    with torch.no_grad():
        for mod_path, parts in groups.items():
            layer = model.get_submodule(mod_path)
            delta = layer.lora[adapter_name]
            delta.A.copy_(parts["A"]), delta.B.copy_(parts["B"])
            if "magnitude" in parts:
                delta.magnitude.copy_(parts["magnitude"])
            if "B_bias" in parts:
                delta.B_bias.copy_(parts["B_bias"])
            if "bias" in parts:
                layer.bias.copy_(parts["bias"])
        for key, (head_path, pname, param) in heads.items():
            if head_path is not None:         # the adapter's own copy, made by apply_lora above
                param = model.get_submodule(head_path).modules_to_save[adapter_name] \
                    .get_parameter(pname)
            param.copy_(extra[key])


def _heads_in_model(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """``cfg`` without the modules_to_save entries that name no module of ``model``, and without repeats.

    PEFT's task_type="SEQ_CLS" (and "TOKEN_CLS") adds both "classifier" and "score" to the
    saved modules_to_save whatever the model has, and PEFT skips names that match nothing. Loading does
    the same, because the file's keys are the truth: a head whose weights are in the file but not in the
    model is still refused (as an unexpected key). apply_lora stays strict: there an unmatched name is
    a typo.
    """
    names = [n for n, _ in candidate_modules(model)]
    kept = [p for p in dict.fromkeys(cfg.modules_to_save or [])
            if any(matches_module(n, p) for n in names)]
    return cfg if kept == (cfg.modules_to_save or []) else replace(cfg, modules_to_save=kept or None)
