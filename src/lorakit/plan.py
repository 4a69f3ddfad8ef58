"""A dry run of apply_lora: what would be adapted, the shapes, and what it costs.

``plan_lora(model, cfg)`` changes nothing. Its table is what ``lorakit inspect`` prints:

    trainable = sum over targets of params(A) + params(B)  (+ modules_to_save, + biases per bias mode)
    Linear:    r * (in + out)          Conv:      r * in * prod(kernel) + out * r
    Embedding: r * (num + dim)         Fused:     k * r * in + k * (out / n) * r   (k of n slices)
    adapter size on disk ~= 4 bytes * trainable (fp32 safetensors) + a small header
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.layers import wrap_module
from lorakit.module_paths import is_adapter_param, matches_module
from lorakit.modules_to_save import ModulesToSave
from lorakit.targeting import Target, candidate_modules, find_targets, resolve_config

DORA_KINDS = ("linear", "conv1d-gpt2", "embedding", "conv")     # not fused slices
LORA_BIAS_KINDS = ("linear", "conv1d-gpt2", "conv")            # PEFT: not on embeddings


@dataclass
class PlanRow:
    name: str
    layer: str
    r: int
    alpha: float
    scale: float
    a_shape: tuple
    b_shape: tuple
    magnitude: int = 0            # DoRA: one learnt norm per output feature
    lora_bias: int = 0            # lora_bias: one bias per output feature

    @property
    def params(self) -> int:
        return math.prod(self.a_shape) + math.prod(self.b_shape) + self.magnitude + self.lora_bias


@dataclass
class LoraPlan:
    rows: list[PlanRow]
    base_params: int
    saved_modules: dict[str, int] = field(default_factory=dict)   # name -> params trained in full
    bias_params: int = 0
    targets: list[Target] = field(default_factory=list, repr=False)
    config: LoraConfig | None = field(default=None, repr=False)   # with model-dependent fields resolved

    @property
    def lora_params(self) -> int:
        return sum(row.params for row in self.rows)

    @property
    def trainable_params(self) -> int:
        return self.lora_params + sum(self.saved_modules.values()) + self.bias_params

    @property
    def total_params(self) -> int:
        return self.base_params + self.lora_params + sum(self.saved_modules.values())

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    @property
    def adapter_bytes(self) -> int:
        return 4 * self.trainable_params

    def table(self) -> str:
        named = [(r.name, r.layer, str(r.r), f"{r.scale:.3g}", str(r.a_shape), str(r.b_shape),
                  f"{r.params:,}") for r in self.rows]
        named += [(n, "trained in full (modules_to_save)", "", "", "", "", f"{c:,}")
                  for n, c in self.saved_modules.items()]
        header = ("module", "layer", "r", "scale", "A", "B", "params")
        widths = [max(len(row[i]) for row in named + [header]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header)] + [fmt.format(*row) for row in named] + [self.summary()]
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"{len(self.rows)} modules adapted | LoRA params {self.lora_params:,} | trainable "
                f"{self.trainable_params:,} of {self.total_params:,} ({self.trainable_pct:.3f}%) | "
                f"adapter file ~{format_bytes(self.adapter_bytes)} (fp32) vs base "
                f"~{format_bytes(4 * self.base_params)}")

    def __str__(self) -> str:
        return self.table()


def plan_lora(model: nn.Module, cfg: LoraConfig) -> LoraPlan:
    """Everything apply_lora would do, computed without touching the model."""
    if not isinstance(cfg, LoraConfig):      # PEFT's config is also called LoraConfig: an easy slip
        raise LoraError(f"expected a lorakit.LoraConfig, got {type(cfg).__module__}."
                        f"{type(cfg).__qualname__}; build one with lorakit.LoraConfig(r=8, alpha=16, "
                        "target_modules=[...]) (PEFT's lora_alpha is alpha here, lora_dropout dropout)")
    cfg.validate()
    cfg = resolve_config(model, cfg)
    targets = find_targets(model, cfg)
    for on, kinds, what in ((cfg.dora, DORA_KINDS, "dora=True (DoRA)"),
                            (cfg.lora_bias, LORA_BIAS_KINDS, "lora_bias=True")):
        bad = [f"{t.name} ({t.kind})" for t in targets if on and t.kind not in kinds]
        if bad:
            raise LoraError(f"{what} is implemented for {kinds} layers; these targets are not: "
                            f"{bad[:6]}. Drop them from target_modules or turn it off")
    rows = []
    for target in targets:
        layer = wrap_module(target.module, target.kind, target.fused_mask)   # allocates nothing
        r = cfg.rank_for(target.name)
        a_shape, b_shape = layer.factor_shapes(r)
        rows.append(PlanRow(target.name, layer.describe_base(), r, cfg.alpha_for(target.name),
                            cfg.scale_for(target.name), tuple(a_shape), tuple(b_shape),
                            b_shape[0] if cfg.dora else 0, b_shape[0] if cfg.lora_bias else 0))
    saved = {name: sum(p.numel() for p in module.parameters())
             for name, module in resolve_modules_to_save(model, cfg)}
    bias_params = _bias_params(model, cfg, {t.name for t in targets})
    base = sum(p.numel() for p in model.parameters()) - _lora_params_already(model)
    return LoraPlan(rows, base, saved, bias_params, targets, cfg)


def resolve_modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    """(name, module) for each modules_to_save pattern; a pattern that matches nothing is an error."""
    found = []
    for pattern in cfg.modules_to_save or []:
        hits = [(n, m) for n, m in candidate_modules(model) if matches_module(n, pattern)]
        if not hits:
            leaves = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            raise LoraError(f"modules_to_save entry {pattern!r} matches no module; module names end "
                            f"in: {leaves[:40]}")
        found += [(n, m.original_module if isinstance(m, ModulesToSave) else m) for n, m in hits]
    return found


def _bias_params(model: nn.Module, cfg: LoraConfig, target_names: set[str]) -> int:
    if cfg.bias == "all":
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    if cfg.bias == "lora_only":
        modules = dict(model.named_modules())
        return sum(modules[n].bias.numel() for n in target_names
                   if getattr(modules[n], "bias", None) is not None)
    return 0


def _lora_params_already(model: nn.Module) -> int:
    """Parameters of adapters and head copies added earlier, so base counts only the base."""
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))


def format_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} GB"
