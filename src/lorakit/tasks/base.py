"""What a task provides to the training engine: data, a model per method, a forward, defaults.

A task is an object with these members (see ``tasks/text_cls.py`` for a short complete example):

    name: str                      CLI name (``--task``)
    metric: str                    primary validation metric ("val_auc" or "val_accuracy")
    methods: tuple[str, ...]       the methods ``compare`` runs by default
    settings(method, quick) -> TrainSettings        defaults for full and --quick runs
    load_data(quick, seed, data_dir) -> (train, val)  TensorData with a "labels" tensor
    build_model(method, options) -> nn.Module       pretrained base + head, method applied
    forward(model, batch) -> logits                 (batch, classes) or (batch,) for one logit
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelOptions:
    """Per-run choices the CLI may override on top of a task's defaults."""

    r: int | None = None
    alpha: float | None = None
    targets: list[str] | None = None
    extra: dict = field(default_factory=dict)
