"""LoRA layer types. Each replaces the module it adapts and keeps its ``weight``/``bias`` keys."""

from lorakit.layers.base import LoraLayer, LowRankDelta, is_quantized
from lorakit.layers.conv import LoraConv
from lorakit.layers.dora import DoraDelta
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.fused import LoraFusedLinear
from lorakit.layers.linear import LoraLinear
from lorakit.layers.lora_function import use_fused
from lorakit.layers.wrap import is_gpt2_conv1d, wrap_module

__all__ = ["LoraLayer", "LowRankDelta", "DoraDelta", "LoraLinear", "LoraEmbedding", "LoraConv",
           "LoraFusedLinear", "wrap_module", "is_gpt2_conv1d", "use_fused", "is_quantized"]
