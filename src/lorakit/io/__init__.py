"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    names.py        file and key names             peft_format.py  PEFT's config fields and tensor keys
    files.py        atomic writes, safe paths      save.py         lora_state_dict, save_adapter
    checks.py       what a load checks first       load.py         read_adapter, read_metadata, load_adapter
    fingerprint.py  serve parity: probe outputs recorded at save, compared when served
"""

from lorakit.io.files import atomic_write, folder_bytes, inside
from lorakit.io.fingerprint import fingerprint_metadata
from lorakit.io.load import load_adapter, read_adapter, read_metadata, set_adapter_weights
from lorakit.io.names import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from lorakit.io.peft_format import config_from_peft, peft_config_dict
from lorakit.io.save import lora_state_dict, save_adapter

__all__ = ["load_adapter", "read_adapter", "read_metadata", "set_adapter_weights", "save_adapter",
           "lora_state_dict", "config_from_peft", "peft_config_dict", "fingerprint_metadata", "atomic_write",
           "folder_bytes", "inside", "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]
