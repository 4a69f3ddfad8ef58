"""``dora``: LoRA on the task's targets, each turned into DoRA (layers/dora.py), plus the task head.

Trainable parameters per adapted (out x in) matrix: r (in + out) for A and B, + out for the magnitude.
Saved with ``lorakit.save_adapter`` in PEFT's format (use_dora=true, ``lora_magnitude_vector``), so the
file loads in lorakit (``load_adapter``) and in PEFT with the same outputs.
"""

from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.inject import apply_lora, refresh_trainable
from lorakit.layers.dora import to_dora
from lorakit.plan import plan_lora

DORA_KINDS = ("linear", "conv1d-gpt2")


def apply_dora(model: nn.Module, spec) -> nn.Module:
    cfg = LoraConfig(r=spec.r, alpha=spec.alpha, target_modules=spec.lora_targets,
                     dropout=spec.dropout, rslora=spec.rslora, modules_to_save=spec.head)
    bad = [f"{t.name} ({t.kind})" for t in plan_lora(model, cfg).targets if t.kind not in DORA_KINDS]
    if bad:                                            # refuse before anything is changed
        raise LoraError(f"dora adapts Linear / GPT-2 Conv1D layers only; these targets are not: {bad}. "
                        f"Choose targets of kinds {DORA_KINDS}")
    apply_lora(model, cfg)
    to_dora(model, "default")
    refresh_trainable(model)                           # the new magnitudes train with A and B
    return model
