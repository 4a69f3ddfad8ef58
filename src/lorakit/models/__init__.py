"""Pretrained bases, loaded offline: ``lorakit.models.load("minilm")`` or a local HF directory.

Nothing heavy is imported here; transformers is imported when a model is actually loaded.
"""

from lorakit.models.registry import KNOWN_MODELS, LoadedModel, load, resolve

__all__ = ["KNOWN_MODELS", "LoadedModel", "load", "resolve"]
