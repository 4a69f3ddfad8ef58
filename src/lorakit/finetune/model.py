"""The base model for a finetune run: loaded offline (models/registry.py), LoRA added, and, with
--grad-checkpoint, activation checkpointing per transformer block.

Activation checkpointing keeps only each block's input during the forward and recomputes the block's
activations in the backward (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
activation memory falls from O(layers x per-block activations) to O(layers x hidden + one block), for
about one extra forward of compute. transformers implements it per decoder layer
(``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``); the non-reentrant
form needs no input that requires grad, so it works with a frozen embedding under LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import LoraError
from lorakit.finetune.config import FinetuneConfig
from lorakit.inject import apply_lora
from lorakit.models import load
from lorakit.models.registry import resolve
from lorakit.quant import quantize_for_training

HEAD_NAMES = ("classifier", "score")         # BERT-style and decoder sequence-classification heads


def is_causal_lm(model_name: str) -> bool:
    """From the model's config.json (a GGUF file holds a decoder LM): does it generate text?"""
    path, _ = resolve(model_name)
    config_file = Path(path) / "config.json"
    if str(model_name).lower().endswith(".gguf") or not config_file.is_file():
        return True
    config = json.loads(config_file.read_text())
    archs = config.get("architectures") or []
    return bool(config.get("is_decoder")) or any(a.endswith("ForCausalLM") for a in archs)


def load_model(cfg: FinetuneConfig, task: str, num_labels: int = 2):
    """(model, tokenizer) for ``task``: a causal LM for sft, a sequence classifier for classify."""
    if task == "sft" and not is_causal_lm(cfg.model):
        raise LoraError(f"--model {cfg.model} is an encoder (no language-model head), so it cannot "
                        "learn to generate answers; use --task classify with labelled data, or a "
                        "decoder model such as smollm2")
    loaded = load(cfg.model, task="causal-lm" if task == "sft" else "classification",
                  num_labels=num_labels)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer.pad_token_id is None:       # Llama-style tokenizers: pad with the end token
        tokenizer.pad_token = tokenizer.eos_token
    if task == "classify" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id   # the score head finds the last real token
    return model, tokenizer


def parse_targets(text: str) -> list[str] | str:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise LoraError(f"--targets {text!r} names no modules; e.g. --targets q_proj,v_proj or "
                        "all-linear")
    return ALL_LINEAR if items == [ALL_LINEAR] else items


def classifier_head(model: nn.Module) -> list[str]:
    names = [name for name, _ in model.named_children() if name in HEAD_NAMES]
    if not names:
        raise LoraError(f"{type(model).__name__} has no classification head named {HEAD_NAMES}; "
                        "load the model with a sequence-classification head")
    return names


def add_lora(model: nn.Module, cfg: FinetuneConfig, task: str) -> nn.Module:
    """LoRA on --targets (plus the new head trained in full for classification); raises LoraError,
    model untouched, when a target matches nothing."""
    lora = LoraConfig(r=cfg.r, alpha=cfg.alpha, target_modules=parse_targets(cfg.targets),
                      dropout=cfg.dropout, rslora=cfg.rslora, dora=cfg.dora, init=cfg.init,
                      modules_to_save=classifier_head(model) if task == "classify" else None)
    model = apply_lora(model, lora)
    if cfg.quantize:                 # after LoRA: only the frozen base weights are quantized
        quantize_for_training(model, cfg.quantize, "lora", embeddings=cfg.quantize_embeddings)
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    model.head_modules = []
    return model


def enable_grad_checkpoint(model: nn.Module) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraError(f"--grad-checkpoint: {type(model).__name__} does not support activation "
                        "checkpointing in transformers; drop --grad-checkpoint")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
