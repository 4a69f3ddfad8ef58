"""Validation metrics from a maintained library (scikit-learn), never hand-rolled."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and (for two classes) ROC-AUC of the positive class.

    ``logits``: (n,) or (n, 1) for a single binary logit (BCE), (n, C) for C classes (cross-entropy).
    """
    from sklearn.metrics import accuracy_score, roc_auc_score     # deferred: heavy optional dependency

    logits, labels = logits.float().cpu(), labels.cpu()
    if logits.dim() == 1 or logits.shape[-1] == 1:
        logits = logits.reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits, labels.float()).item()
        scores, predicted = torch.sigmoid(logits), (logits > 0).long()
    else:
        loss = F.cross_entropy(logits, labels.long()).item()
        probs = torch.softmax(logits, dim=-1)
        scores, predicted = (probs[:, 1] if probs.shape[1] == 2 else None), probs.argmax(-1)
    out = {"val_loss": loss, "val_accuracy": float(accuracy_score(labels.numpy(), predicted.numpy()))}
    if scores is not None and len(np.unique(labels.numpy())) == 2:
        out["val_auc"] = float(roc_auc_score(labels.numpy(), scores.numpy()))
    return out


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE for one logit per example, cross-entropy for several."""
    if logits.dim() == 1 or logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


# Which way is better for each metric name, for "best" tracking and early stopping.
HIGHER_IS_BETTER = {"val_auc": True, "val_accuracy": True, "val_loss": False, "val_bleu": True}
