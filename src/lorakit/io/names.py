"""File and key names of an adapter folder (PEFT's, so folders are interchangeable with PEFT)."""

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."               # PEFT's key prefix in adapter_model.safetensors
META_KEY = "lorakit"                       # safetensors metadata entry holding lorakit's JSON record
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
