"""Writing an adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format.

A method that changed the frozen weight itself (PiSSA's residual, ReLoRA's merges) records the change on
the adapter as ``offset_B @ offset_A`` (W = W_original + s offset_B offset_A); the file then holds the whole
change against the *original* weight, [B, offset_B] [A; offset_A] at the same scale (PEFT's PiSSA
conversion), so it loads, in lorakit and PEFT, onto the untouched base model.
The safetensors metadata ``lorakit`` (JSON) records the base model's weight shape for every adapted
module and the fused-slice layouts, so loading onto the wrong base fails with both shapes named.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import base_biases, lora_layers, saved_module_wrappers
from lorakit.io.files import atomic_write
from lorakit.io.names import CONFIG_NAME, META_KEY, PREFIX, WEIGHTS_NAME
from lorakit.io.peft_format import factor_keys, peft_config_dict
from lorakit.layers import LoraEmbedding, LoraFusedLinear, LoraLayer, is_quantized
from lorakit.state import check_adapter, has_lora


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (what ``save_adapter`` writes)."""
    return {PREFIX + k: v.detach().contiguous().clone()
            for k, v in adapter_tensors(model, adapter_name).items()}


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{PEFT key without the prefix: the model's own tensor} for the adapter (live, not copies; factors
    with a recorded weight offset come out concatenated, see ``_export_factors``)."""
    cfg = check_adapter(model, adapter_name).configs[adapter_name]
    out = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora:
            continue
        delta = layer.lora[adapter_name]
        a, b = factor_keys(isinstance(layer, LoraEmbedding))
        out[f"{path}.{a}"], out[f"{path}.{b}"] = _export_factors(delta)
        if delta.magnitude is not None:
            out[f"{path}.lora_magnitude_vector"] = delta.magnitude
        if delta.B_bias is not None:
            out[f"{path}.lora_B.bias"] = delta.B_bias
        if cfg.bias == "lora_only" and layer.bias is not None:
            out[f"{path}.base_layer.bias"] = layer.bias
    if cfg.bias == "all":
        out.update(_all_biases(model))
    for path, wrapper in saved_module_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{path}.{pname}"] = p
    return out


def _export_factors(delta) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as saved: with a recorded weight offset, [A; offset_A] (r+k, in) and [B, offset_B] (out, r+k)."""
    if delta.offset_A is None:
        return delta.A, delta.B
    return torch.cat([delta.A, delta.offset_A]), torch.cat([delta.B, delta.offset_B], dim=1)


def _export_config(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> LoraConfig:
    """``cfg`` as the file's tensors are: each module's exported rank (its factors plus a recorded
    offset) and an alpha that keeps its scale s. Where modules differ from the common (r, alpha) they
    get rank_pattern / alpha_pattern entries, so PEFT and lorakit read back the same adapter (PiSSA
    offsets, combined adapters of mixed rank); a config that already says it all is kept as is."""
    exported = {}
    for path, layer in lora_layers(model):
        if adapter_name in layer.lora:
            delta = layer.lora[adapter_name]
            r = delta.r + (0 if delta.offset_A is None else delta.offset_A.shape[0])
            exported[path] = (r, delta.scale * (math.sqrt(r) if cfg.rslora else r))
    if all(cfg.rank_for(p) == r and math.isclose(cfg.alpha_for(p), a, rel_tol=1e-9)
           for p, (r, a) in exported.items()):
        return cfg
    r0 = Counter(r for r, _ in exported.values()).most_common(1)[0][0]
    a0 = Counter(round(a, 9) for _, a in exported.values()).most_common(1)[0][0]
    a0 = next(a for _, a in exported.values() if round(a, 9) == a0)
    return replace(cfg, r=r0, alpha=a0,
                   rank_pattern={p: r for p, (r, _) in exported.items() if r != r0},
                   alpha_pattern={p: a for p, (_, a) in exported.items()
                                  if not math.isclose(a, a0, rel_tol=1e-9)})


def _all_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """bias="all": every base bias, under PEFT's ``base_layer.bias`` key where LoRA wraps the layer."""
    owners = dict(model.named_modules())
    out = {}
    for name, p in base_biases(model).items():
        owner = name.rpartition(".")[0]
        out[f"{owner}.base_layer.bias" if isinstance(owners.get(owner), LoraLayer) else name] = p
    return out


QUANT_RECORD = "_lorakit_quant"     # model.__dict__ key lorakit.quant.quantize_base writes


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, metadata: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write ``path/adapter_config.json`` and ``path/adapter_model.safetensors`` (atomically).
    ``metadata`` adds entries to the lorakit record in the safetensors header (JSON values).

    dtype: by default each tensor is written in the dtype it is held in: LoRA factors, DoRA magnitudes
    and lora_bias in fp32 (kept so even on a half-precision model), modules_to_save heads and trained
    biases in the model's dtype. ``dtype=torch.bfloat16`` (or float16) writes every tensor in that
    dtype, half the file; loading casts back to fp32 factors.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise LoraError(f"dtype={dtype!r} must be a floating torch dtype (torch.float32, torch.bfloat16, "
                        "torch.float16) or None (as held)")
    quant_record = model.__dict__.get(QUANT_RECORD)
    if quant_record is not None and not has_lora(model):
        raise LoraError("this is a quantized base model, not an adapter: save_adapter writes trained "
                        "LoRA factors only. Add and train LoRA (apply_lora), or keep the quantized "
                        "base with lorakit.quant.save_quantized(model, dir)")
    cfg = check_adapter(model, adapter_name).configs[adapter_name]
    tensors = lora_state_dict(model, adapter_name)
    frozen = [k for k, t in tensors.items() if is_quantized(t)]
    if frozen:
        raise LoraError(f"{frozen[0]} is a quantized base weight (a quantized module in "
                        "modules_to_save?); an adapter holds trained 16/32-bit tensors only. Keep "
                        "quantized modules out of modules_to_save (quantize_base(..., skip=[...]))")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    cfg = _export_config(model, cfg, adapter_name)
    layers = [(p, l) for p, l in lora_layers(model) if adapter_name in l.lora]
    meta = {"adapter_name": adapter_name,
            "base_shapes": {p: list(l.weight.shape) for p, l in layers},
            "fused_slices": {p: l.mask for p, l in layers if isinstance(l, LoraFusedLinear)},
            "init": cfg.init,
            # lorakit-only settings PEFT's config has no field for:
            "config": {"fused_slices": cfg.fused_slices, "strict": cfg.strict, "init": cfg.init},
            # trained on a quantized base (QLoRA): how it was quantized; loads on the 16-bit base too
            **({"quantized_base": quant_record} if quant_record is not None else {}),
            **(metadata or {})}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    conv1d = any(getattr(l, "fan_in_fan_out", False) for _, l in layers)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(
        tensors, tmp, metadata={"format": "pt", META_KEY: json.dumps(meta)}))
    config = peft_config_dict(cfg, base_model_name_or_path, fan_in_fan_out=conv1d)
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return out
