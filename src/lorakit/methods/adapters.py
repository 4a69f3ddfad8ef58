"""Bottleneck adapters (the paper's Adapter^H and Adapter^L baselines).

    adapter(h) = h + up(act(norm(h) @ down))        h: (..., d), down: d -> r, up: r -> d, up = 0 at init

An adapter sits on the output of a sub-layer's output projection, before the residual add (and, in
BERT, before the post-LayerNorm), so the model equals its base at step 0 and keeps the extra depth at
inference: adapters cannot be merged into the weights (the latency cost of Table 1).

    adapter-houlsby  two per block: after the attention output projection and after the FFN
                     (Houlsby et al. 2019); norm = identity; every LayerNorm of the model trains too
    adapter-lin      one per block, after the FFN, with its own LayerNorm in front (Lin et al. 2020)

|Theta| = L_Adpt (2 d r + r + d) + 2 L_LN d (the LoRA paper, section 5.1): L_Adpt adapters of two
linear layers with biases, and L_LN trainable LayerNorms (gamma, beta): Houlsby's are the model's own
LayerNorms, Lin's the one in each adapter. ``spec.r`` is the bottleneck width r.

Sites are found by module name: ``spec.extra["targets"]`` (regexes matched against the end of module
names at a dot, e.g. "output.dense", r"layer\\.\\d+\\.output\\.dense") or the defaults per architecture.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.module_paths import replace_module
from lorakit.methods.method_files import MethodIO, check_head, train_only

# model_type -> (attention output projection, FFN output projection), as name patterns
SITES = {
    "bert": (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),      # BERT, MiniLM
    "roberta": (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),
    "whisper": (r"self_attn\.out_proj", r"fc2"),
    "llama": (r"self_attn\.o_proj", r"mlp\.down_proj"),
}


class Bottleneck(nn.Module):
    """h + up(act(down(norm(h)))): (..., d) -> (..., d); the identity while ``up`` is zero."""

    def __init__(self, d: int, r: int, layer_norm: bool, dtype=None, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=dtype, device=device) if layer_norm else nn.Identity()
        self.down = nn.Linear(d, r, dtype=dtype, device=device)
        self.up = nn.Linear(r, d, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)           # start as the base model
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.relu(self.down(self.norm(h))))


class AdapterLinear(nn.Module):
    """An ``nn.Linear`` followed by a bottleneck adapter: y = adapter(x W0^T + b).

    It owns the Linear's ``weight`` and ``bias``, so the base's state-dict keys do not change."""

    def __init__(self, base: nn.Linear, r: int, layer_norm: bool):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapter = Bottleneck(base.out_features, r, layer_norm, base.weight.dtype, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def apply_houlsby(model: nn.Module, spec) -> nn.Module:
    return _apply(model, spec, "adapter-houlsby", apply_houlsby, sites=(0, 1), layer_norm=False)


def apply_lin(model: nn.Module, spec) -> nn.Module:
    return _apply(model, spec, "adapter-lin", apply_lin, sites=(1,), layer_norm=True)


def _apply(model, spec, method, apply, sites, layer_norm) -> nn.Module:
    check_head(model, spec.head)
    if isinstance(spec.r, bool) or not isinstance(spec.r, int) or spec.r < 1:
        raise LoraError(f"r={spec.r!r} is the adapter bottleneck width; use a positive integer, e.g. 8")
    patterns = spec.extra.get("targets") or default_targets(model, sites)
    targets = find_linear_targets(model, patterns)
    for name, linear in targets:
        replace_module(model, name, AdapterLinear(linear, spec.r, layer_norm))
    trainable = [p for n, p in model.named_parameters() if ".adapter." in n]
    if method == "adapter-houlsby":                 # Houlsby et al. also train the LayerNorms
        trainable += [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    train_only(model, trainable, spec.head)
    model.method_io = MethodIO(method, spec, apply,
                               base_shapes={f"{n}.weight": tuple(l.weight.shape) for n, l in targets})
    return model


def default_targets(model: nn.Module, sites: tuple[int, ...]) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SITES:
        raise LoraError(f"no default adapter sites for model_type={model_type!r} (known: "
                        f"{sorted(SITES)}); name the output projections in "
                        "AdaptSpec.extra['targets'], e.g. ['o_proj', 'down_proj']")
    return [SITES[model_type][i] for i in sites]


def find_linear_targets(model: nn.Module, patterns: list[str]) -> list[tuple[str, nn.Linear]]:
    """Modules whose name ends (at a dot) with a match of one of ``patterns``; all must be Linear."""
    found = [(name, m) for name, m in model.named_modules()
             if any(re.fullmatch(rf"(?:.*\.)?(?:{p})", name) for p in patterns)]
    if not found:
        raise LoraError(f"no module name matches {patterns}; pass output-projection names that "
                        "exist in the model (see model.named_modules())")
    wrong = [(name, type(m).__name__) for name, m in found if type(m) is not nn.Linear]
    if wrong:
        raise LoraError(f"adapters wrap nn.Linear output projections, but {wrong[:3]} matched "
                        f"{patterns}; narrow the patterns")
    return found
