"""One server's parts, built from ServeSettings: the base model and tokenizer, the adapter cache,
the classification pool, the metrics and the scheduler thread that owns the models."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import LoraError
from lorakit.finetune.model import is_causal_lm
from lorakit.models import LoadedModel, load
from lorakit.serve.adapter_cache import AdapterCache
from lorakit.serve.classify import ClassifierPool
from lorakit.serve.metrics import ServeMetrics
from lorakit.serve.scheduler import Scheduler
from lorakit.serve.settings import ServeSettings


@dataclass
class Server:
    settings: ServeSettings
    tokenizer: object
    model: torch.nn.Module | None          # the causal LM, None for an encoder-only base
    context: int
    metrics: ServeMetrics
    adapters: AdapterCache
    classifiers: ClassifierPool
    scheduler: Scheduler

    @property
    def base_name(self) -> str:
        return self.settings.base_name


def build_server(settings: ServeSettings, loaded: LoadedModel | None = None) -> Server:
    """Load the base (unless ``loaded`` is given) and wire the parts; the scheduler is not started."""
    causal = is_causal_lm(settings.model) if loaded is None else \
        bool(getattr(loaded.model, "can_generate", lambda: False)())
    if loaded is None:
        loaded = load(settings.model, task="causal-lm" if causal else "base")
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise LoraError(f"the tokenizer of {settings.model} has neither a pad nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    model = loaded.model.eval() if causal else None
    if model is not None:
        for p in model.parameters():
            p.requires_grad_(False)
    config = getattr(loaded.model, "config", None)
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or \
        int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))
    metrics = ServeMetrics()
    classifiers = ClassifierPool(settings.model, tokenizer)
    adapters = AdapterCache(model, classifiers, settings.adapters, settings.max_loaded, metrics,
                            settings.base_name)
    scheduler = Scheduler(model, tokenizer, adapters, metrics, settings.max_batch, settings.max_queue,
                          settings.prefill_tokens, context)
    return Server(settings, tokenizer, model, context, metrics, adapters, classifiers, scheduler)
