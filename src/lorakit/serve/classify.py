"""Sequence-classification adapters (``POST /v1/classify``): texts -> label probabilities.

An adapter trained with a classification head (``modules_to_save`` = the model's ``classifier`` or
``score``) brings its own trained head; the base's fresh head is never used. Heads of different sizes
need different models, so the pool keeps one classification copy of the base per label count, built
the first time an adapter needs it. Each request runs its adapter alone (``set_adapter``): heads
cannot differ per batch row.

    p(label | text) = softmax(head(encoder_adapted(text)))       logits (n_texts, num_labels)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.adapters import set_adapter
from lorakit.errors import LoraError
from lorakit.inject import activate
from lorakit.models import load

HEAD_NAMES = ("classifier", "score")
MAX_TEXT_TOKENS = 512


def head_size(modules_to_save: list[str] | None, tensors: dict) -> int | None:
    """Output rows of the adapter's classification head (classifier/score), None if it has none."""
    for head in modules_to_save or []:
        if head.split(".")[-1] not in HEAD_NAMES:
            continue
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):
            if key in tensors and tensors[key].dim() == 2:
                return int(tensors[key].shape[0])
    return None


def label_names(folder: Path, num_labels: int) -> list[str]:
    """Names from ``label_map.json`` (written by ``lorakit finetune --task classify``), else LABEL_i."""
    try:
        id2label = json.loads((Path(folder) / "label_map.json").read_text())["id2label"]
        names = [str(id2label[str(i)]) for i in range(num_labels)]
    except (OSError, ValueError, KeyError, TypeError):
        names = [f"LABEL_{i}" for i in range(num_labels)]
    return names


class ClassifierPool:
    def __init__(self, model_name: str, tokenizer):
        self.model_name, self.tokenizer = model_name, tokenizer
        self.models: dict[int, torch.nn.Module] = {}      # label count -> classification model
        self.owner: dict[str, int] = {}                  # adapter key -> label count

    def model_for_labels(self, num_labels: int, key: str):
        if num_labels not in self.models:
            loaded = load(self.model_name, task="classification", num_labels=num_labels)
            model = loaded.model
            if getattr(model.config, "pad_token_id", None) is None:
                model.config.pad_token_id = self.tokenizer.pad_token_id   # score head: last real token
            self.models[num_labels] = model.eval()
        self.owner[key] = num_labels
        return self.models[num_labels]

    def model_for(self, key: str):
        return self.models[self.owner[key]]

    def forget(self, key: str) -> None:
        self.owner.pop(key, None)

    @torch.no_grad()
    def classify(self, key: str, texts: list[str]) -> torch.Tensor:
        """(n_texts, num_labels) probabilities under adapter ``key``."""
        model = self.model_for(key)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                               return_tensors="pt")
        set_adapter(model, [key])
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            activate(model, [])
        if not torch.isfinite(logits).all():
            raise LoraError("the classifier produced non-finite scores for this input")
        return logits.float().softmax(-1)
