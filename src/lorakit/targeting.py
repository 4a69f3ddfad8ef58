"""Which modules of a model a LoraConfig adapts, and a strict check that every pattern was meant.

PEFT only complains when *nothing* matches, so a typo in one of three patterns silently trains a
third less than intended. Here each suffix pattern must match at least one module (``strict=True``),
and the error suggests the closest module names. A match of a type LoRA cannot wrap is an error too.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig, pattern_matches
from lorakit.errors import LoraError
from lorakit.layers import LoraFusedLinear, LoraLayer, LoraLinear
from lorakit.modules_to_save import ModulesToSave

DEFAULT_LAYERS_PATTERNS = ("layers", "layer", "h", "blocks", "block")
SUPPORTED = "nn.Linear, GPT-2 Conv1D, nn.Embedding, nn.Conv1d/2d/3d"


@dataclass
class Target:
    name: str
    module: nn.Module
    kind: str                 # "linear", "conv1d-gpt2", "embedding", "conv", "fused"
    fused_mask: list[bool] | None = None


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def module_kind(module: nn.Module) -> str | None:
    """The LoRA layer family that can wrap ``module``, or None if none can."""
    if isinstance(module, LoraFusedLinear):
        return "fused"
    if isinstance(module, LoraLinear):
        return "conv1d-gpt2" if module.fan_in_fan_out else "linear"
    if isinstance(module, LoraLayer):
        return type(module).__name__
    if isinstance(module, nn.Linear):
        return "linear"
    if is_gpt2_conv1d(module):
        return "conv1d-gpt2"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules a pattern may match: everything except the insides of LoRA layers and wrappers."""
    out, inside = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        out.append((name, module))
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name)
    return out


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[Target]:
    """The modules ``cfg`` adapts, in model order. Raises LoraError for patterns that match nothing
    (when strict) and for matches of an unsupported type."""
    modules = candidate_modules(model)
    names = [n for n, _ in modules]
    matched = [(n, m) for n, m in modules if _is_target(n, m, model, cfg)]
    _check_every_pattern_matched(cfg, names, matched)
    selected = [(n, m) for n, m in matched
                if not _is_excluded(n, cfg) and _in_selected_layers(n, cfg)]
    if not selected:
        raise LoraError(f"target_modules={cfg.target_modules!r} matched {len(matched)} modules, but "
                        f"exclude_modules / layers_to_transform removed them all")
    targets = []
    for name, module in selected:
        kind = module_kind(module)
        if kind is None:
            raise LoraError(f"module {name!r} matched target_modules but is {type(module).__name__}; "
                            f"LoRA supports {SUPPORTED}. Target its linear children instead, e.g. "
                            f"{_children_hint(module, name)}")
        mask = _fused_mask(name, cfg)
        if mask is not None and kind not in ("linear", "conv1d-gpt2", "fused"):
            raise LoraError(f"fused_slices names {name!r}, which is {type(module).__name__}; "
                            "slices apply to linear projections only")
        targets.append(Target(name, module, "fused" if mask is not None else kind, mask))
    return targets


def _is_target(name: str, module: nn.Module, model: nn.Module, cfg: LoraConfig) -> bool:
    target = cfg.target_modules
    if target == ALL_LINEAR:
        return module_kind(module) in ("linear", "conv1d-gpt2", "fused") \
            and name not in output_head_names(model, cfg)
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def output_head_names(model: nn.Module, cfg: LoraConfig) -> set[str]:
    """Modules 'all-linear' leaves alone: the output head, and modules trained in full anyway."""
    heads = set(cfg.modules_to_save or [])
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("lm_head",) or \
                any(name == h or name.endswith("." + h) for h in heads):
            heads.add(name)
    return heads


def _check_every_pattern_matched(cfg: LoraConfig, names: list[str], matched: list) -> None:
    target = cfg.target_modules
    if isinstance(target, str):
        unmatched = [target] if not matched else []
    else:
        unmatched = [t for t in target if not any(n == t or n.endswith("." + t) for n, _ in matched)]
    if not unmatched:
        return
    leaves = sorted({n.split(".")[-1] for n in names})
    hints = "; ".join(f"{p!r}: did you mean {difflib.get_close_matches(p, leaves, n=3, cutoff=0.4)}"
                      for p in unmatched)
    message = (f"target_modules {unmatched} matched no module of the model ({hints}). "
               f"Module names end in: {leaves[:40]}")
    if cfg.strict or not matched:
        raise LoraError(message)
    warnings.warn(message, stacklevel=3)


def _is_excluded(name: str, cfg: LoraConfig) -> bool:
    excl = cfg.exclude_modules
    if excl is None:
        return False
    if isinstance(excl, str):
        return re.fullmatch(excl, name) is not None
    return any(name == e or name.endswith("." + e) for e in excl)


def layer_index(name: str, layers_pattern) -> int | None:
    """The block index in ``name`` (``encoder.layer.3.attention.query`` -> 3), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else \
        list(layers_pattern or DEFAULT_LAYERS_PATTERNS)
    alternatives = "|".join(re.escape(p) for p in patterns)
    found = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _in_selected_layers(name: str, cfg: LoraConfig) -> bool:
    if cfg.layers_to_transform is None:
        return True
    return layer_index(name, cfg.layers_pattern) in cfg.layers_to_transform


def _fused_mask(name: str, cfg: LoraConfig) -> list[bool] | None:
    for pattern, mask in cfg.fused_slices.items():
        if pattern_matches(pattern, name):
            return list(mask)
    return None


def _children_hint(module: nn.Module, name: str) -> list[str]:
    return [f"{name}.{child}" for child, sub in module.named_modules()
            if child and module_kind(sub) is not None][:4]
