"""Which modules of a model a LoraConfig adapts, and a strict check that every pattern was meant.

Patterns follow the one rule of ``lorakit.module_paths.matches_module``. PEFT only complains when
*nothing* matches, so a typo in one of three patterns silently trains a
third less than intended. Here each suffix pattern must match at least one module (``strict=True``),
and the error suggests the closest module names. A match of a type LoRA cannot wrap is an error too.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass, replace

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import LoraError
from lorakit.layers import LoraFusedLinear, LoraLayer, LoraLinear, is_gpt2_conv1d
from lorakit.module_paths import matches_module
from lorakit.modules_to_save import ModulesToSave
from lorakit.peft_names import DEFAULT_TARGETS, TASK_HEADS

DEFAULT_LAYERS_PATTERNS = ("layers", "layer", "h", "blocks", "block")
SUPPORTED = "nn.Linear, GPT-2 Conv1D, nn.Embedding, nn.Conv1d/2d/3d"


@dataclass
class Target:
    name: str
    module: nn.Module
    kind: str                 # "linear", "conv1d-gpt2", "embedding", "conv", "fused"
    fused_mask: list[bool] | None = None


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


def resolve_config(model: nn.Module, cfg: LoraConfig) -> LoraConfig:
    """``cfg`` with what depends on the model filled in, as PEFT does: ``target_modules=None`` becomes
    the usual targets of the model's architecture (``peft_names.DEFAULT_TARGETS`` by
    ``model.config.model_type``; a warning names them), and a ``task_type`` whose PEFT model trains a
    head (SEQ_CLS, TOKEN_CLS: classifier / score; QUESTION_ANS: qa_outputs) adds the heads the model
    has to ``modules_to_save``."""
    changes = {}
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type)
        if targets is None:
            known = ", ".join(sorted(DEFAULT_TARGETS)[:12])
            raise LoraError(f"target_modules=None picks the usual targets of a known architecture "
                            f"({known}, ...), but this model's config.model_type is {model_type!r}; name "
                            "the modules (e.g. ['q_proj', 'v_proj']) or use 'all-linear'. `lorakit "
                            "inspect MODEL` lists them")
        changes["target_modules"] = list(targets) if isinstance(targets, list) else targets
        warnings.warn(f"target_modules=None: adapting {targets!r}, the usual targets for model_type "
                      f"{model_type!r} (PEFT's defaults)", stacklevel=4)
    heads = TASK_HEADS.get(cfg.task_type, ())
    names = [n for n, _ in candidate_modules(model)] if heads else []
    extra = [h for h in heads if h not in (cfg.modules_to_save or [])
             and any(matches_module(n, h) for n in names)]
    if extra:
        changes["modules_to_save"] = list(cfg.modules_to_save or []) + extra
    return replace(cfg, **changes) if changes else cfg


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[Target]:
    """The modules ``cfg`` adapts, in model order. Raises LoraError for patterns that match nothing
    (when strict) and for matches of an unsupported type."""
    modules = candidate_modules(model)
    names = [n for n, _ in modules]
    mha = [(n, m) for n, m in modules if isinstance(m, nn.MultiheadAttention)]
    inside_mha = {n for n, _ in modules if _mha_parent(n, mha)}
    if cfg.target_modules == ALL_LINEAR and any(_is_target(n, m, model, cfg) for n, m in modules
                                                if n in inside_mha):
        warnings.warn(f"'all-linear' leaves out {sorted(inside_mha)[:4]}: nn.MultiheadAttention reads "
                      "its projection weights directly, so LoRA there would do nothing", stacklevel=4)
    matched = [(n, m) for n, m in modules if _is_target(n, m, model, cfg)
               and not (cfg.target_modules == ALL_LINEAR and n in inside_mha)]
    _check_every_pattern_matched(cfg, names, matched)
    selected = [(n, m) for n, m in matched
                if not _is_excluded(n, cfg) and _in_selected_layers(n, cfg)]
    if not selected:
        raise LoraError(f"target_modules={cfg.target_modules!r} matched {len(matched)} modules, but "
                        f"exclude_modules / layers_to_transform removed them all")
    targets = []
    for name, module in selected:
        _refuse_multihead_attention(name, module, modules)
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


def _mha_parent(name: str, modules: list) -> str | None:
    """The nn.MultiheadAttention ``name`` sits inside, if any."""
    mha = [n for n, m in modules if isinstance(m, nn.MultiheadAttention)]
    return next((n for n in mha if name.startswith(n + ".")), None)


def _refuse_multihead_attention(name: str, module: nn.Module, modules: list) -> None:
    if isinstance(module, nn.MultiheadAttention):
        raise LoraError(f"module {name!r} is an nn.MultiheadAttention: LoRA on its packed in/out "
                        "projection weights (PEFT's MultiheadAttention LoRA) is not implemented in "
                        "lorakit; adapt the model's other layers, or build attention from nn.Linear "
                        "projections")
    parent = _mha_parent(name, modules)
    if parent is not None:
        raise LoraError(f"module {name!r} sits inside the nn.MultiheadAttention {parent!r}, which reads "
                        "its weight directly (F.multi_head_attention_forward), so LoRA there would do "
                        "nothing; drop it from target_modules")


def _is_target(name: str, module: nn.Module, model: nn.Module, cfg: LoraConfig) -> bool:
    target = cfg.target_modules
    if target == ALL_LINEAR:
        return module_kind(module) in ("linear", "conv1d-gpt2", "fused") \
            and name not in output_head_names(model, cfg)
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(matches_module(name, t) for t in target)


def output_head_names(model: nn.Module, cfg: LoraConfig) -> set[str]:
    """Modules 'all-linear' leaves alone: the output head, and modules trained in full anyway."""
    heads = set(cfg.modules_to_save or [])
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("lm_head",) or \
                any(matches_module(name, h) for h in heads):
            heads.add(name)
    return heads


def _check_every_pattern_matched(cfg: LoraConfig, names: list[str], matched: list) -> None:
    target = cfg.target_modules
    if isinstance(target, str):
        unmatched = [target] if not matched else []
    else:
        unmatched = [t for t in target if not any(matches_module(n, t) for n, _ in matched)]
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
    return any(matches_module(name, e) for e in excl)


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
        if matches_module(name, pattern):
            return list(mask)
    return None


def _children_hint(module: nn.Module, name: str) -> list[str]:
    return [f"{name}.{child}" for child, sub in module.named_modules()
            if child and module_kind(sub) is not None
            and not isinstance(module, nn.MultiheadAttention)][:4]
