"""A quantized model on disk: one safetensors file, the 4/8-bit pieces stored as they are.

    save_quantized(model, "out/q")            # out/q/quantized_model.safetensors
    load_quantized(plain_model, "out/q")      # same architecture, any weights: gets the stored ones

Keys: a dense tensor under its state-dict key; a quantized weight under ``<key>.qdata.<piece>``
(``codes``, ``scale_codes``, ...). The header's ``lorakit_quant`` JSON holds, per quantized key, its
scheme, settings, shape and dtype, the model's quantization record, and tied keys (``lm_head.weight``
= ``model.embed_tokens.weight``) stored once. Loading checks every key and shape before it changes the
model. This is the base model, not an adapter: adapters stay in PEFT's format (``save_adapter``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.errors import LoraError
from lorakit.layers import LoraLayer, is_quantized
from lorakit.quant.quantize import RECORD
from lorakit.quant.tensor import QuantizedWeight

FILE_NAME = "quantized_model.safetensors"
META = "lorakit_quant"


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the whole (quantized) model's weights to ``path/quantized_model.safetensors``."""
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LoraError("this model has LoRA layers; save_quantized stores the base only. Save the "
                        "adapter with save_adapter, or merge_and_unload(model, requantize=True) first")
    tensors, weights, aliases, first = {}, {}, {}, {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[key] = first[id(t)]
            continue
        first[id(t)] = key
        if is_quantized(t):
            weights[key] = {"scheme": t.scheme, "meta": t.meta, "shape": list(t.shape),
                            "dtype": str(t.dtype).replace("torch.", "")}
            for piece, v in t.qdata.items():
                tensors[f"{key}.qdata.{piece}"] = v.detach().contiguous()
        else:
            tensors[key] = t.detach().contiguous()
    header = {"weights": weights, "aliases": aliases, "record": model.__dict__.get(RECORD)}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (FILE_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", META: json.dumps(header)})
    os.replace(tmp, out / FILE_NAME)
    return out


def _set_quantized(model: nn.Module, new: dict, aliases: dict, own: dict) -> None:
    """Each quantized key's Parameter into the model, and the same Parameter under each key tied to it
    (``lm_head.weight`` -> ``model.embed_tokens.weight``), so tied weights stay one shared object."""
    params = {key: nn.Parameter(q, requires_grad=False) for key, q in new.items()}
    params |= {alias: params[key] for alias, key in aliases.items() if key in params and alias in own}
    for key, param in params.items():
        owner, _, leaf = key.rpartition(".")
        setattr(model.get_submodule(owner), leaf, param)


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``save_quantized``'s file into ``model`` (the same architecture, unquantized or not);
    in place, returns the model. Everything is checked before the first weight is replaced."""
    file = Path(path) / FILE_NAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise LoraError(f"no {FILE_NAME} at {path}; write one with save_quantized(model, dir)")
    with safe_open(str(file), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get(META, "null") or "null")
        if not header:
            raise LoraError(f"{file} has no {META} header; it was not written by save_quantized")
        stored = {k: f.get_tensor(k) for k in f.keys()}
    own = model.state_dict(keep_vars=True)
    want = set(own) - set(header["aliases"])
    have = set(header["weights"]) | {k for k in stored if ".qdata." not in k}
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise LoraError(f"{file} does not fit this model: missing {missing[:5]}, unexpected "
                        f"{extra[:5]}; load it into the architecture it was saved from")
    new = {}
    for key, info in header["weights"].items():
        if list(own[key].shape) != info["shape"]:
            raise LoraError(f"{key}: stored shape {info['shape']} but the model has "
                            f"{list(own[key].shape)}")
        data = {k.rpartition(".qdata.")[2]: v for k, v in stored.items()
                if k.startswith(key + ".qdata.")}
        new[key] = QuantizedWeight(data, info["scheme"], info["meta"], tuple(info["shape"]),
                                   getattr(torch, info["dtype"]))
    for key, t in stored.items():
        if ".qdata." not in key and tuple(own[key].shape) != tuple(t.shape):
            raise LoraError(f"{key}: stored shape {list(t.shape)} but the model has {list(own[key].shape)}")
    _set_quantized(model, new, header["aliases"], own)      # checked: now change the model
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, t in stored.items():
            if ".qdata." not in key:
                own[key].copy_(t)
    if header.get("record"):
        model.__dict__[RECORD] = header["record"]
    return model
