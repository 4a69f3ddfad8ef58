"""The two finetune tasks in the shape train/loop.py drives: ``forward``, ``loss``, ``evaluate``.

SFT loss (next-token cross-entropy on trained tokens only), over the N targets of a batch:

    h = decoder(input_ids, attention_mask | position_ids)       (B, W, H)   no KV cache in training
    pick positions t with labels[t + 1] != -100                  (N, H)
    logits = lm_head(h[picked])                                  (N, V)
    loss = mean_n CE(logits_n, labels[t_n + 1])

The LM head runs on the N target positions only, not on all B * W: the head of a 49k-vocabulary model
is a large share of a small model's compute, and (B, W, V) fp32 logits would be the largest
activation. Models whose head does more than a Linear (logit soft-capping, scaling) take the plain
full forward and the same positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.finetune.batches import TokenData
from lorakit.finetune.encode import IGNORE
from lorakit.train.loop import autocast
from lorakit.train.metrics import classification_loss


def _recorded(task, loss: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():                  # a training micro-batch, not an evaluation
        task.train_losses.append(loss.item())
    return loss


def _model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def _targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(picked (B, W-1) bool, targets (N,)) of a batch: positions whose next token is trained."""
    nxt = batch["labels"][:, 1:]
    picked = nxt != IGNORE
    return picked, nxt[picked]


class SFTTask:
    name = "finetune-sft"
    metric = "val_loss"

    def __init__(self, train_data: TokenData):
        self.train_data = train_data
        self.train_losses: list[float] = []        # every training micro-batch, for the loss curve

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Logits (N, V) at the positions that predict a trained token."""
        picked, _ = _targets(batch)
        core = getattr(model, "module", model)          # DDP keeps the model in .module
        head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
        config = getattr(core, "config", None)
        plain_head = isinstance(head, nn.Module) and not (
            getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))
        if not plain_head or model is not core:          # DDP must see its own forward
            logits = model(**_model_inputs(batch), use_cache=False).logits
            return logits[:, :-1][picked]
        hidden = core.get_decoder()(**_model_inputs(batch), use_cache=False).last_hidden_state
        return head(hidden[:, :-1][picked])

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        _, targets = _targets(batch)
        return _recorded(self, F.cross_entropy(logits.float(), targets))

    def evaluate(self, model: nn.Module, data: TokenData, device, settings) -> dict:
        """Validation loss per target token, and the training throughput so far."""
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad(), autocast(device, settings.precision):
            for start in range(0, len(data), settings.batch_size):
                index = torch.arange(start, min(start + settings.batch_size, len(data)))
                batch = {k: v.to(device) for k, v in data.take(index).items()}
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n:
                    total += self.loss(self.forward(model, batch), batch).item() * n
                    count += n
        model.train(was_training)
        return {"val_loss": total / max(count, 1), **self.throughput()}

    def progress_fields(self, train_time: float) -> dict:
        return {"tok/s": f"{self.train_data.tokens_served / max(train_time, 1e-9):.0f}"}

    def throughput(self) -> dict:
        return {"tokens_seen": self.train_data.tokens_served}


class ClassifyTask:
    """Sequence classification: the loop's default cross-entropy and accuracy (train/metrics.py)."""

    name = "finetune-classify"
    metric = "val_accuracy"

    def __init__(self, train_data: TokenData):
        self.train_data = train_data
        self.train_losses: list[float] = []

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return _recorded(self, classification_loss(logits, batch["labels"]))

    def progress_fields(self, train_time: float) -> dict:
        return {"tok/s": f"{self.train_data.tokens_served / max(train_time, 1e-9):.0f}"}
