"""Quantized frozen bases under LoRA (QLoRA, Dettmers et al. 2023): NF4 or int8 weights, fp32 factors.

    lorakit.quantize_base(model, "nf4")         # frozen Linear weights -> 4-bit NF4, double-quantized scales
    lorakit.apply_lora(model, cfg)              # train as usual; only the factors learn
    lorakit.merge_and_unload(model)             # exact: 16/32-bit W = dequant(Wq) + s B A
    lorakit.merge_and_unload(model, requantize=True, threshold=0.5)   # 4-bit again, error measured

``tensor.py`` the weight type, ``formats.py`` NF4 and int8, ``quantize.py`` planning and quantizing,
``merge.py`` merging, ``files.py`` a quantized model on disk. The core (layers, inject, io) never
imports this package: it sees a quantized weight through ``lorakit.layers.is_quantized``.
"""

from lorakit.quant.files import load_quantized, save_quantized
from lorakit.quant.formats import NF4_HALF_GAP, NF4_TABLE, SCHEMES
from lorakit.quant.merge import merge_and_unload
from lorakit.quant.quantize import (QuantPlan, check_embeddings_option, check_frozen,
                                    dequantize_base, memory_table,
                                    plan_quantize, quantize_as_recorded, quantize_base,
                                    quantize_for_training, quantize_with_report, quantized_weights,
                                    weight_memory)
from lorakit.quant.tensor import QuantizedWeight, quantize_weight

__all__ = ["quantize_base", "plan_quantize", "QuantPlan", "dequantize_base", "merge_and_unload",
           "save_quantized", "load_quantized", "QuantizedWeight", "quantize_weight", "check_frozen",
           "weight_memory", "memory_table", "quantize_with_report", "quantize_for_training",
           "quantize_as_recorded", "quantized_weights", "check_embeddings_option", "SCHEMES",
           "NF4_TABLE", "NF4_HALF_GAP"]
