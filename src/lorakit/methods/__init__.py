"""Adaptation methods by name: how a pretrained model is made trainable for a task.

    full    every parameter trains (the baseline LoRA is measured against)
    frozen  the pretrained body is frozen; only the task head trains
    lora    LoRA on the task's target matrices (the paper: attention q, v), plus the head
    ...     the baselines of the paper (bitfit, ia3, adapter-houlsby, adapter-lin, prefix) and the
            LoRA family (dora, rslora, pissa, lora-plus, adalora, relora, galore), each in its own
            module, imported only when asked for (``METHODS`` maps name -> "module:function")

Each method takes the model and an AdaptSpec, freezes what it does not train (the task head always
trains), and returns the model, ready for the training loop. A method that changes *how* training
runs (its optimizer, schedule, or per-step work) attaches ``model.train_hooks`` (methods/hooks.py).
``spec.r`` is every method's size knob: LoRA rank, adapter bottleneck width, prefix length, GaLore rank.
"""

from __future__ import annotations

import importlib

from torch import nn

from lorakit.errors import LoraError
from lorakit.methods.spec import AdaptSpec, apply_plain_lora


def _full(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    model.requires_grad_(True)
    return model


def _frozen(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    model.requires_grad_(False)
    for name in spec.head:
        model.get_submodule(name).requires_grad_(True)
    return model


METHODS = {
    "full": _full, "frozen": _frozen, "lora": apply_plain_lora,
    # the LoRA paper's baselines (Hu et al. 2021, Tables 2-4)
    "bitfit": "lorakit.methods.bitfit:apply_bitfit",
    "ia3": "lorakit.methods.ia3:apply_ia3",
    "adapter-houlsby": "lorakit.methods.adapters:apply_houlsby",
    "adapter-lin": "lorakit.methods.adapters:apply_lin",
    "prefix": "lorakit.methods.prefix:apply_prefix",
    # the LoRA family and GaLore (each file cites its paper)
    "dora": "lorakit.methods.dora:apply_dora",
    "rslora": "lorakit.methods.lora_variants:apply_rslora",
    "pissa": "lorakit.methods.lora_variants:apply_pissa",
    "lora-plus": "lorakit.methods.lora_variants:apply_lora_plus",
    "adalora": "lorakit.methods.adalora:apply_adalora",
    "relora": "lorakit.methods.relora:apply_relora",
    "galore": "lorakit.methods.galore:apply_galore",
}


# Methods whose trainable-parameter count does not depend on spec.r (galore's rank sizes its optimizer
# state, not what trains): `compare --sizes` runs them once.
UNSIZED = frozenset({"full", "frozen", "bitfit", "ia3", "galore"})

__all__ = ["AdaptSpec", "METHODS", "UNSIZED", "apply_method", "method_function"]


def method_function(method: str):
    if method not in METHODS:
        raise LoraError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    found = METHODS[method]
    if isinstance(found, str):
        module, name = found.split(":")
        found = getattr(importlib.import_module(module), name)
    return found


def apply_method(model: nn.Module, method: str, spec: AdaptSpec) -> nn.Module:
    model = method_function(method)(model, spec)
    model.head_modules = list(spec.head)       # the training loop gives these TrainSettings.head_lr
    return model
