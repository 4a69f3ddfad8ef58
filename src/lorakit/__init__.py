"""lorakit: Low-Rank Adaptation (Hu et al. 2021) for any PyTorch model, PEFT-compatible on disk.

    h = W0 x + b + s * B A dropout(x),   s = alpha / r  (or alpha / sqrt(r) with rslora=True)
"""

from lorakit.adapters import (active_adapters, add_adapter, delete_adapter, disable_adapter,
                              list_adapters, mixed_adapters, set_adapter, set_row_adapters,
                              set_trainable)
from lorakit.combine import combine_adapters
from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import (apply_lora, lora_layers, merge_and_unload, merge_lora,
                            trainable_parameters, unmerge_lora)
from lorakit.io import load_adapter, lora_state_dict, read_adapter, save_adapter
from lorakit.plan import LoraPlan, plan_lora

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraError", "LoraPlan",
    "apply_lora", "plan_lora", "merge_lora", "unmerge_lora", "merge_and_unload",
    "trainable_parameters", "lora_layers",
    "add_adapter", "set_adapter", "delete_adapter", "disable_adapter", "list_adapters",
    "active_adapters", "set_trainable", "mixed_adapters", "set_row_adapters", "combine_adapters",
    "save_adapter", "load_adapter", "lora_state_dict", "read_adapter",
    "__version__",
]
