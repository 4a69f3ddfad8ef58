"""(IA)^3 (Liu et al. 2022): learned vectors, initialised to 1, that rescale inner activations.

    keys, values:   k = (W_k x + b_k) * l_k        l_k, l_v: (d,)   scale the projection's output
    FFN:            y = W_2 (a * l_ff) + b_2       l_ff: (d_ff,)    scales the down-projection's input
                                                                    a = act(W_1 x + b_1)

|Theta| = L (2 d + d_ff) (attention key/value widths may differ from d, e.g. grouped-query Llama).
The rescaling folds into the weights exactly: W_k <- diag(l_k) W_k, b_k <- l_k * b_k, and
W_2 <- W_2 diag(l_ff); so a merged model is the plain base architecture (``merge_ia3``).

Files are PEFT's IA3 format (peft 0.21 ``tuners/ia3``): adapter_config.json with peft_type "IA3",
target_modules and feedforward_modules (regexes, fully matched against module names, as PEFT does
with a string), modules_to_save = the head; tensors "base_model.model.<module>.ia3_l" of shape
(out, 1) for keys/values and (1, in) for feed-forward modules, and "base_model.model.<head>.<param>".
An IA3 adapter PEFT wrote (list or regex targets) loads too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.module_paths import replace_module
from lorakit.io import PREFIX, WEIGHTS_NAME
from lorakit.methods.method_files import check_head, read_folder, train_only, write_folder
# model_type -> (key/value projections, FFN down-projection), as name patterns
SITES = {
    "bert": (r"attention\.self\.(?:key|value)", r"layer\.\d+\.output\.dense"),     # BERT, MiniLM
    "roberta": (r"attention\.self\.(?:key|value)", r"layer\.\d+\.output\.dense"),
    "whisper": (r"self_attn\.(?:k_proj|v_proj)", r"fc2"),
    "llama": (r"self_attn\.(?:k_proj|v_proj)", r"mlp\.down_proj"),
}
# PEFT IA3 options that change what the adapter computes; lorakit refuses them rather than ignore them
UNSUPPORTED = ("fan_in_fan_out", "layers_to_transform", "layers_pattern")


class IA3Linear(nn.Module):
    """An ``nn.Linear`` with an (IA)^3 vector; owns the Linear's weight and bias (state-dict keys stay).

    feedforward=False: y = (x W^T + b) * l,   l: (out,)
    feedforward=True:  y = (x * l) W^T + b,   l: (in,)"""

    def __init__(self, base: nn.Linear, feedforward: bool):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return F.linear(x * self.ia3_l, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * self.ia3_l

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            l = self.ia3_l.detach()
            linear.weight.copy_(self.weight * (l[None, :] if self.feedforward else l[:, None]))
            if self.bias is not None:
                linear.bias.copy_(self.bias if self.feedforward else self.bias * l)
        return linear

    def peft_shape(self) -> tuple[int, int]:
        return self.peft_shape_of(self, self.feedforward)

    @staticmethod
    def peft_shape_of(linear: nn.Module, feedforward: bool) -> tuple[int, int]:
        """PEFT stores l as (1, in) for feed-forward modules, (out, 1) otherwise."""
        return (1, linear.in_features) if feedforward else (linear.out_features, 1)


# --- apply ------------------------------------------------------------------------------------------
def apply_ia3(model: nn.Module, spec) -> nn.Module:
    """(IA)^3 on the keys, values and FFN down-projections (defaults per architecture, or
    ``spec.extra["targets"]`` and ``spec.extra["feedforward"]``, both given: regexes, or lists of
    them, matched against the end of module names). ``spec.r`` is unused: (IA)^3 has no size knob."""
    check_head(model, spec.head)
    if "targets" in spec.extra and "feedforward" in spec.extra:
        kv, ff = spec.extra["targets"], spec.extra["feedforward"]
    else:
        kv, ff = _default_sites(model)
    kv, ff = _alternatives(kv), _alternatives(ff)
    config = {"target_modules": rf"(?:.*\.)?(?:{kv}|{ff})", "feedforward_modules": rf"(?:.*\.)?(?:{ff})",
              "modules_to_save": list(spec.head) or None}
    return _inject(model, config, _targets(model, config))


def _alternatives(patterns) -> str:
    """One regex from a regex or a list of them."""
    return patterns if isinstance(patterns, str) else "|".join(f"(?:{p})" for p in patterns)


def _default_sites(model: nn.Module) -> tuple[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SITES:
        raise LoraError(f"no default (IA)^3 sites for model_type={model_type!r} (known: "
                        f"{sorted(SITES)}); set AdaptSpec.extra['targets'] (key/value projections) "
                        "and AdaptSpec.extra['feedforward'] (FFN down-projections)")
    return SITES[model_type]


def _targets(model: nn.Module, config: dict) -> list[tuple[str, nn.Linear, bool]]:
    """(name, Linear, is_feedforward) for every module PEFT's matching rules select."""
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(config["target_modules"], name, dot=True):
            continue
        if type(module) is not nn.Linear:
            raise LoraError(f"(IA)^3 targets nn.Linear layers, but {name!r} is a "
                            f"{type(module).__name__}; narrow target_modules")
        found.append((name, module, _matches(config.get("feedforward_modules") or [], name, dot=False)))
    if not found:
        raise LoraError(f"no module of {type(model).__name__} matches target_modules="
                        f"{config['target_modules']!r}; name modules of this model")
    return found


def _matches(patterns, name: str, dot: bool) -> bool:
    """PEFT's rules: a string is a regex matched in full; a list matches by name suffix (with a dot
    boundary for target_modules; without one for feedforward_modules, as PEFT's IA3 does)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith(f".{p}" if dot else p) for p in patterns)


def _inject(model: nn.Module, config: dict, targets: list) -> nn.Module:
    for name, linear, feedforward in targets:
        replace_module(model, name, IA3Linear(linear, feedforward))
    head = [h for h in config.get("modules_to_save") or [] if h in dict(model.named_modules())]
    train_only(model, [m.ia3_l for m in model.modules() if isinstance(m, IA3Linear)], head)
    model.method_io = IA3IO(config, head)
    return model


# --- files, merge -----------------------------------------------------------------------------------
class IA3IO:
    """``model.method_io`` for (IA)^3: PEFT-format save / load, and an exact merge."""

    def __init__(self, config: dict, head: list[str]):
        self.config, self.head = config, head

    def save(self, model: nn.Module, folder: str | os.PathLike) -> Path:
        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, IA3Linear):
                tensors[f"{PREFIX}{name}.ia3_l"] = module.ia3_l.detach().reshape(module.peft_shape())
        for head in self.head:
            for pname, p in model.get_submodule(head).named_parameters():
                tensors[f"{PREFIX}{head}.{pname}"] = p.detach()
        tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
        config = {"peft_type": "IA3", "task_type": None, "inference_mode": True,
                  "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
                  or None, "revision": None,
                  "target_modules": self.config["target_modules"],
                  "feedforward_modules": self.config["feedforward_modules"],
                  "exclude_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True,
                  "modules_to_save": self.head or None,
                  "layers_to_transform": None, "layers_pattern": None}
        return write_folder(folder, tensors, config)

    def load(self, base: nn.Module, folder: str | os.PathLike) -> nn.Module:
        return load_ia3(base, folder)

    def merge(self, model: nn.Module) -> nn.Module:
        return merge_ia3(model)


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every (IA)^3 vector into its Linear (exact up to rounding); returns the plain model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, IA3Linear):
            replace_module(model, name, module.merged())
    model.method_io = None
    return model


def load_ia3(base: nn.Module, folder: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """Load a PEFT-format IA3 adapter (ours or PEFT's) onto ``base``; every check runs first."""
    folder = Path(folder)
    config, tensors = _read(folder)
    targets = _targets(base, config)
    want = {f"{PREFIX}{name}.ia3_l": (list(IA3Linear.peft_shape_of(m, ff)), name)
            for name, m, ff in targets}
    modules = dict(base.named_modules())
    head = [h for h in config.get("modules_to_save") or [] if h in modules]   # PEFT adds "score" for BERT
    for h in head:
        for pname, p in modules[h].named_parameters():
            want[f"{PREFIX}{h}.{pname}"] = (list(p.shape), f"{h}.{pname}")
    for key, (shape, name) in want.items():
        if key not in tensors:
            raise LoraError(f"{folder / WEIGHTS_NAME} lacks {key} for module {name!r}; it was saved "
                            "for another model")
        if list(tensors[key].shape) != shape:
            raise LoraError(f"{folder / WEIGHTS_NAME} holds {key} of shape {list(tensors[key].shape)}, "
                            f"but module {name!r} of this base needs {shape}; load it onto the base "
                            "model it was trained on")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise LoraError(f"{folder / WEIGHTS_NAME} holds tensors this base has no place for: {extra[:3]}; "
                        "it was saved for another model")
    model = _inject(base, config, targets)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, IA3Linear):
                module.ia3_l.copy_(tensors[f"{PREFIX}{name}.ia3_l"].flatten())
        for h in head:
            for pname, p in model.get_submodule(h).named_parameters():
                p.copy_(tensors[f"{PREFIX}{h}.{pname}"])
    if not trainable:
        model.requires_grad_(False)
    return model


def _read(folder: Path) -> tuple[dict, dict]:
    def check(config: dict, path: Path) -> None:
        if config.get("peft_type") != "IA3":
            raise LoraError(f"{path} is not an IA3 adapter (peft_type={config.get('peft_type')!r}); "
                            "LoRA adapters load with lorakit.load_adapter")
        bad = [k for k in UNSUPPORTED if config.get(k)]
        if config.get("exclude_modules"):
            bad.append("exclude_modules")
        if bad or not config.get("target_modules"):
            raise LoraError(f"{path} uses IA3 options lorakit does not reproduce: "
                            f"{bad or ['no target_modules']}; re-save it without them")
    return read_folder(folder, "an IA3 adapter", check)
