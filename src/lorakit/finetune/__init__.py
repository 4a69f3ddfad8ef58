"""``lorakit finetune``: your model, your data file -> a PEFT-format LoRA adapter, a report, and
answers before/after. Reading (data.py), record formats (formats.py), tokens and loss masks
(encode.py), packing and length-grouped batches (batches.py), the tasks the training loop drives
(task.py), the model (model.py), checks before anything runs (prepare.py), the run (run.py)."""

from lorakit.finetune.config import FinetuneConfig, resolve
from lorakit.finetune.run import run_finetune

__all__ = ["FinetuneConfig", "resolve", "run_finetune"]
