"""Choosing the LoRA layer type for a base module."""

from __future__ import annotations

from torch import nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.fused import LoraFusedLinear
from lorakit.layers.linear import LoraLinear


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def wrap_module(module: nn.Module, kind: str, fused_mask=None) -> LoraLayer:
    """A LoRA layer around ``module`` (no adapter yet); an existing LoRA layer is returned as is.
    ``kind`` is what ``lorakit.targeting.module_kind`` says of the module (or "fused")."""
    if isinstance(module, LoraLayer):
        return module
    if kind == "fused":
        return LoraFusedLinear(module, fused_mask, fan_in_fan_out=is_gpt2_conv1d(module))
    if kind == "linear":
        return LoraLinear(module)
    if kind == "conv1d-gpt2":
        return LoraLinear(module, fan_in_fan_out=True)
    if kind == "embedding":
        return LoraEmbedding(module)
    if kind == "conv":
        return LoraConv(module)
    raise ValueError(f"unknown layer kind {kind!r}")
