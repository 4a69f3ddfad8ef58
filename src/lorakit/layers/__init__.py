"""LoRA layer types. Each replaces the module it adapts and keeps its ``weight``/``bias`` keys."""

from lorakit.layers.base import LoraLayer, LowRankDelta
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.fused import LoraFusedLinear
from lorakit.layers.linear import LoraLinear
from lorakit.layers.lora_function import use_fused

__all__ = ["LoraLayer", "LowRankDelta", "LoraLinear", "LoraEmbedding", "LoraConv", "LoraFusedLinear",
           "wrap_module", "use_fused"]


def wrap_module(module, kind: str, fused_mask=None) -> LoraLayer:
    """A LoRA layer around ``module`` (no adapter yet); an existing LoRA layer is returned as is."""
    if isinstance(module, LoraLayer):
        return module
    if kind == "fused":
        from lorakit.targeting import is_gpt2_conv1d
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
