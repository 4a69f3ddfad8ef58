"""lorakit: Low-Rank Adaptation (Hu et al. 2021) for any PyTorch model, PEFT-compatible on disk.

    h = W0 x + b + s * B A dropout(x),   s = alpha / r  (or alpha / sqrt(r) with rslora=True)
"""

from lorakit import hf  # lorakit.hf.prepare_for_trainer; it imports transformers only when called
from lorakit.adapters import (active_adapters, add_adapter, delete_adapter, disable_adapter,
                              end_compiled_switching, list_adapters, mixed_adapters,
                              prepare_compiled_switching, set_adapter, set_row_adapters,
                              set_trainable)
from lorakit.tools.combine import combine_adapters
from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import (apply_lora, get_nb_trainable_parameters, lora_layers, merge_lora,
                            print_trainable_parameters, trainable_parameters, unload, unmerge_lora)
from lorakit.io import load_adapter, lora_state_dict, read_adapter, save_adapter
from lorakit.plan import LoraPlan, plan_lora
# merge_and_unload from quant: inject's, plus the quantized-base cases (exact default, requantize=True)
from lorakit.quant import merge_and_unload, quantize_base

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraError", "LoraPlan", "hf",
    "apply_lora", "plan_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
    "trainable_parameters", "print_trainable_parameters", "get_nb_trainable_parameters", "unload",
    "lora_layers",
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "list_adapters",
    "active_adapters", "set_trainable", "mixed_adapters", "set_row_adapters", "combine_adapters",
    "prepare_compiled_switching", "end_compiled_switching",
    "save_adapter", "load_adapter", "lora_state_dict", "read_adapter", "quantize_base",
    "__version__",
]
