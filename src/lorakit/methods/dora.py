"""``dora``: LoRA on the task's targets with DoRA (Liu et al. 2024; ``layers/dora.py``), plus the task head.

Trainable parameters per adapted (out x in) matrix: r (in + out) for A and B, + out for the magnitude.
Saved with ``lorakit.save_adapter`` in PEFT's format (use_dora=true, ``lora_magnitude_vector``), so the
file loads in lorakit (``load_adapter``) and in PEFT with the same outputs. Non-linear targets are
refused by ``plan_lora`` before anything changes.
"""

from __future__ import annotations

from torch import nn

from lorakit.methods.spec import AdaptSpec, apply_plain_lora


def apply_dora(model: nn.Module, spec: AdaptSpec) -> nn.Module:
    return apply_plain_lora(model, spec, dora=True)
