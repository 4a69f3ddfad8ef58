"""The checks a load runs on the untouched model before anything is injected or copied."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.io.names import PREFIX
from lorakit.layers import LoraFusedLinear, wrap_module
from lorakit.plan import resolve_modules_to_save
from lorakit.targeting import module_kind


def check_values(tensors: dict, path) -> None:
    """Every tensor is floating point and finite: an integer factor would be cast silently, a NaN/inf
    one can only compute non-finite outputs."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise LoraError(f"{path}: {PREFIX + key} has dtype {value.dtype}; adapter tensors are "
                            "floating point (fp32 / fp16 / bf16). Nothing was loaded")
        bad = (~torch.isfinite(value)).sum().item()
        if bad:
            raise LoraError(f"{path}: {PREFIX + key} holds {bad} NaN/inf of {value.numel()} values; "
                            "the adapter can only compute non-finite outputs. Nothing was loaded")


def check_lora_tensors(model: nn.Module, cfg: LoraConfig, groups: dict, base_shapes: dict,
                       fused: dict, path) -> dict[str, int]:
    """Every adapted module exists and is a type LoRA adapts here, has the recorded base shape, factor
    shapes that fit, the rank the config gives it (r / rank_pattern), and DoRA magnitudes and lora_bias
    biases exactly where the config says. Returns {module path: rank}."""
    if not groups:
        raise LoraError(f"{path} holds no LoRA weights (no lora_A/lora_B keys)")
    ranks = {}
    for mod_path, parts in groups.items():
        for need in ("A", "B"):
            if need not in parts:
                raise LoraError(f"{path}: key for {mod_path}.lora_{need} is missing; the file is "
                                "incomplete")
        module = _module_for(model, mod_path)
        kind = module_kind(module)
        if kind is None:
            raise LoraError(f"the adapter targets {mod_path!r}, which is {type(module).__name__} here; "
                            "it was saved for another base model")
        if mod_path in base_shapes and list(module.weight.shape) != list(base_shapes[mod_path]):
            raise LoraError(f"base model mismatch at {mod_path!r}: the adapter was saved for weight "
                            f"shape {tuple(base_shapes[mod_path])}, this model has "
                            f"{tuple(module.weight.shape)}. Nothing was changed")
        layer = wrap_module(module, "fused" if mod_path in fused else kind, fused.get(mod_path))
        blocks = len(layer.enabled) if isinstance(layer, LoraFusedLinear) else 1
        r = parts["A"].shape[0] // blocks if parts["A"].dim() else 0
        want = layer.factor_shapes(max(r, 1))
        got = (tuple(parts["A"].shape), tuple(parts["B"].shape))
        if r < 1 or got != (tuple(want[0]), tuple(want[1])):
            raise LoraError(f"base model mismatch at {mod_path!r}: adapter factors A{got[0]} B{got[1]} "
                            f"do not fit {layer.describe_base()} (expected A{tuple(want[0])} "
                            f"B{tuple(want[1])}). Nothing was changed")
        if r != cfg.rank_for(mod_path):
            raise LoraError(f"{path}: adapter_config.json gives {mod_path!r} rank {cfg.rank_for(mod_path)} "
                            f"(r / rank_pattern), but its factors have rank {r}; the file is "
                            "inconsistent (PEFT would fail on the shapes). Save it again")
        if "bias" in parts and (layer.bias is None or layer.bias.shape != parts["bias"].shape):
            raise LoraError(f"bias for {mod_path!r} has shape {tuple(parts['bias'].shape)}, the model's "
                            f"is {None if layer.bias is None else tuple(layer.bias.shape)}")
        channels = parts["B"].shape[0]
        _check_extra(parts, "magnitude", cfg.dora, "use_dora", "DoRA's lora_magnitude_vector",
                     tuple(layer.channel_view(torch.empty(channels)).shape), mod_path, path)
        _check_extra(parts, "B_bias", cfg.lora_bias, "lora_bias", "lora_B.bias", (channels,),
                     mod_path, path)
        ranks[mod_path] = r
    return ranks


def _check_extra(parts: dict, part: str, wanted: bool, field: str, what: str, shape: tuple,
                 mod_path: str, path) -> None:
    """A per-layer extra (DoRA magnitude, lora_bias) is present exactly when the config says so."""
    if (part in parts) != wanted:
        raise LoraError(f"{path}: {field}={wanted} in the config, but {mod_path} "
                        f"{'has' if part in parts else 'lacks'} {what}; the file is inconsistent "
                        "(save it again)")
    if wanted and tuple(parts[part].shape) != shape:
        raise LoraError(f"{path}: {mod_path} {what} has shape {tuple(parts[part].shape)}, expected "
                        f"{shape}")


def _module_for(model: nn.Module, mod_path: str) -> nn.Module:
    """The module at ``mod_path``; a path into an nn.MultiheadAttention (PEFT adapts its in/out
    projections) is refused by that name, since lorakit does not implement it."""
    parts = mod_path.split(".")
    for i in range(1, len(parts) + 1):
        try:
            module = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            break
        if isinstance(module, nn.MultiheadAttention):
            raise LoraError(f"the adapter puts LoRA on {'.'.join(parts[:i])!r}, an nn.MultiheadAttention "
                            "(PEFT's LoRA on its packed in/out projection weights), which lorakit does not "
                            "implement; nothing was changed")
    try:
        return model.get_submodule(mod_path)
    except AttributeError:
        raise LoraError(f"the adapter has weights for {mod_path!r}, which this model does not "
                        f"have; it was saved for another base model") from None


STORED_BASE = ".base_layer.weight"      # PEFT's save_embedding_layers: the base weight itself


def check_stored_base_weights(model: nn.Module, extra: dict, path) -> dict:
    """``extra`` without the base weights PEFT stores for adapted embedding / output layers
    (``save_embedding_layers``, on by default when they are targeted). One equal to this model's weight
    says nothing new and is dropped; one that differs (a resized or retrained vocabulary) is refused,
    since the adapter was trained on top of that other weight."""
    modules = dict(model.named_modules())
    rest = {}
    for key, value in extra.items():
        owner = key[:-len(STORED_BASE)] if key.endswith(STORED_BASE) else None
        weight = getattr(modules.get(owner), "weight", None) if owner is not None else None
        if weight is None:
            rest[key] = value
            continue
        if value.shape != weight.shape or not torch.equal(value.to(weight.dtype), weight.detach()):
            diff = "shape " + str(tuple(value.shape)) if value.shape != weight.shape else \
                f"max |diff| {(value.float() - weight.detach().float()).abs().max().item():.3g}"
            raise LoraError(f"{path}: the adapter stores the base weight of {owner!r} (PEFT's "
                            f"save_embedding_layers) and it differs from this model's ({diff}, model "
                            f"{tuple(weight.shape)}): it was trained on a changed base (a resized or "
                            "retrained vocabulary). Load it onto that base, or copy those weights into "
                            "the model first. Nothing was changed")
    return rest


def check_head_tensors(model: nn.Module, cfg: LoraConfig, extra: dict, path) -> dict:
    """Map the non-LoRA keys to (head path, param name, param): modules_to_save parameters or, with
    bias="all", biases of the model. Refuse strays and shape mismatches."""
    wanted = {}
    for head_path, module in resolve_modules_to_save(model, cfg):
        for pname, p in module.named_parameters():
            wanted[f"{head_path}.{pname}"] = (head_path, pname, p)
    params = dict(model.named_parameters())
    targets = {}
    for key, value in extra.items():
        entry = wanted.get(key)
        if entry is None and key.endswith(".bias") and cfg.bias == "all" and key in params:
            entry = (None, None, params[key])
        if entry is None:
            raise LoraError(f"{path}: unexpected key {PREFIX + key!r}; it is neither LoRA, a "
                            "modules_to_save parameter nor a bias of this model")
        if entry[2].shape != value.shape:
            raise LoraError(f"{path}: {key!r} has shape {tuple(value.shape)}, the model's is "
                            f"{tuple(entry[2].shape)}; it was saved for another base model")
        targets[key] = entry
    missing = sorted(set(wanted) - set(extra))
    if missing:
        raise LoraError(f"{path}: modules_to_save weights missing from the file: {missing[:5]}")
    return targets
