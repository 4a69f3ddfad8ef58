"""PEFT's adapter format: the config field names and the tensor keys, both ways.

Keys (adapter name dropped, as PEFT writes them; ``base_model.model.`` prefix stripped here):
    <path>.lora_A.weight / .lora_B.weight          Linear, Conv1D, Conv, fused
    <path>.lora_embedding_A / .lora_embedding_B    Embedding
    <path>.base_layer.bias                         trained bias of an adapted layer
    <path>.bias                                    trained bias elsewhere (bias="all")
    <head>.<param>                                 modules_to_save (e.g. classifier)
    <path>.lora_magnitude_vector                   DoRA's magnitude (use_dora=true)
    <path>.lora_B.bias                             B's bias (lora_bias=true)
"""

from __future__ import annotations

import re
from dataclasses import fields

import torch

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.io.names import PREFIX
from lorakit.peft_names import translate

LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                      r"lora_embedding_B|base_layer\.bias|lora_magnitude_vector|lora_B\.bias)$")
# Tensors PEFT saves for a training-only option; the adapter computes the same without them.
TRAINING_ONLY_KEYS = {"velora_config": ".lora_velora_embed"}   # VeLoRA's backward-pass projection
KEY_PART = {"lora_A.weight": "A", "lora_embedding_A": "A", "lora_B.weight": "B",
            "lora_embedding_B": "B", "base_layer.bias": "bias", "lora_magnitude_vector": "magnitude",
            "lora_B.bias": "B_bias"}


def factor_keys(embedding: bool) -> tuple[str, str]:
    """The key suffixes of A and B: Embedding layers use PEFT's ``lora_embedding_*`` names."""
    return ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")


def strip_prefix(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def group_keys(tensors: dict) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Split a file's tensors into {module path: {"A", "B", "bias"?, "magnitude"?, "B_bias"?}} and the rest
    (modules_to_save parameters, biases of layers without LoRA)."""
    groups, extra = {}, {}
    for key, value in tensors.items():
        found = LORA_KEY.match(key)
        if not found:
            extra[key] = value
            continue
        groups.setdefault(found["path"], {})[KEY_PART[found["part"]]] = value
    for path, parts in list(groups.items()):
        if set(parts) == {"bias"}:                    # bias of a layer without LoRA: bias="all"
            extra[f"{path}.bias"] = groups.pop(path)["bias"]
    return groups, extra


def peft_config_dict(cfg: LoraConfig, base_model_name_or_path: str | None = None,
                     fan_in_fan_out: bool = False) -> dict:
    """``cfg`` in the field names PEFT's LoraConfig reads."""
    return {
        "peft_type": "LORA", "task_type": cfg.task_type, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True,
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": cfg.bias,
        "target_modules": cfg.target_modules, "exclude_modules": cfg.exclude_modules,
        "modules_to_save": cfg.modules_to_save, "fan_in_fan_out": fan_in_fan_out,
        # PEFT accepts lora_bias only with init True; a trained file's init no longer matters
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" and not cfg.lora_bias else True,
        "use_rslora": cfg.rslora, "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern), "layers_to_transform": cfg.layers_to_transform,
        "layers_pattern": cfg.layers_pattern, "use_dora": cfg.dora, "lora_bias": cfg.lora_bias,
    }


def config_from_peft(data: dict) -> LoraConfig:
    """A LoraConfig from PEFT's adapter_config.json fields (``lorakit/peft_names.py``). Options that
    only shaped training are accepted (the file is plain LoRA at inference); options that change what
    the adapter computes are refused by name, and so is an option lorakit does not know, unless unset."""
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in data:
            raise LoraError(f"adapter_config.json lacks {key!r}; it is not a LoRA adapter config")
    values = translate(data, new_adapter=False)
    known = {f.name for f in fields(LoraConfig)}
    unknown = {k: v for k, v in values.items() if k not in known}
    set_unknown = sorted(k for k, v in unknown.items() if v not in (None, False, {}, [], ""))
    if set_unknown:
        raise LoraError(f"adapter_config.json sets {set_unknown}, PEFT options lorakit does not know; "
                        "loading the adapter without them could silently compute something else")
    values = {k: v for k, v in values.items() if k in known}
    return LoraConfig(**{**values, "strict": False})
