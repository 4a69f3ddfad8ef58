"""``relora`` (Lialin et al. 2023): LoRA that periodically folds itself into the weights and starts over,
so a run accumulates an update of rank up to (restarts + 1) * r while training only r at a time.

Every K optimizer steps (``AdaptSpec.extra["relora_every"]``; default ceil(max_steps / 4), i.e. three
restarts per run) each adapted layer does

    W <- W + s B A            merge (the model's function does not change)
    A ~ init, B <- 0          re-init (so s B A = 0 again: still no change)
    Adam state of A, B <- {}  optimizer reset. The paper prunes 99% of the state by magnitude; lorakit
                              resets it fully, the limit of that pruning
and the learning rate follows a jagged schedule: the task's schedule times a ramp that drops to 0 at
each restart and warms back up linearly over ``relora_warmup`` steps (default 5).

Merging writes into the frozen base weight. Each merged s B A is recorded as a weight offset on the
adapter (methods/lora_variants.add_weight_offset), so ``save_adapter`` writes the whole change against
the untouched base as a plain LoRA of rank (restarts + 1) * r, [B, B_1 .. B_k] [A; A_1 .. A_k], exact up
to the fp32 rounding of the merges (no SVD truncation). The offsets are also in the hooks' state, so a
resumed run re-applies the merges to its fresh base.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn

from lorakit.errors import LoraError
from lorakit.inject import lora_layers
from lorakit.layers.base import init_a_random_b_zero
from lorakit.methods.lora_variants import add_weight_offset
from lorakit.methods.spec import apply_plain_lora
from lorakit.state import lora_state
from lorakit.methods.hooks import TrainHooks


class ReLoraHooks(TrainHooks):
    def __init__(self, model: nn.Module, every: int | None, warmup: int):
        self.layers = [(n, l) for n, l in lora_layers(model) if "default" in l.lora]
        self.init = lora_state(model).configs["default"].init
        self.every, self.warmup, self.restarts, self.max_steps = every, warmup, 0, None

    def param_groups(self, model, settings, groups):
        self.max_steps = settings.max_steps
        if self.every is None:                         # the default needs the run's length
            self.every = max(1, math.ceil(settings.max_steps / 4))
        return groups

    def lr_factor(self, step: int, factor: float) -> float:
        since = step % self.every if self.every and step >= self.every else None
        if since is None or since >= self.warmup:
            return factor
        return factor * since / self.warmup           # 0 right after a restart, then a linear ramp

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        if (step + 1) % self.every == 0 and step + 1 != self.max_steps:     # none after the last step
            self.restart(optimizer)

    def restart(self, optimizer=None) -> None:
        """Merge s B A into W, re-init A (random) and B (zero), drop the factors' optimizer state."""
        with torch.no_grad():
            for _, layer in self.layers:
                delta = layer.lora["default"]
                layer.weight.add_(layer.delta_weight(delta).to(layer.weight.dtype))
                add_weight_offset(delta, delta.A, delta.B)
                init_a_random_b_zero(delta, self.init)
                if optimizer is not None:
                    optimizer.state.pop(delta.A, None)
                    optimizer.state.pop(delta.B, None)
        self.restarts += 1

    def state_dict(self) -> dict:
        return {"restarts": self.restarts, "every": self.every,
                "offsets": {n: [l.lora["default"].offset_A, l.lora["default"].offset_B]
                            for n, l in self.layers if l.lora["default"].offset_A is not None}}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the model was rebuilt from the untouched base, so re-apply the recorded merges."""
        self.restarts, self.every = state.get("restarts", 0), state.get("every", self.every)
        layers = dict(self.layers)
        with torch.no_grad():
            for name, (a, b) in state.get("offsets", {}).items():
                layer, delta = layers[name], layers[name].lora["default"]
                a, b = a.to(delta.A.device), b.to(delta.A.device)
                merged = layer.delta_weight(SimpleNamespace(A=a, B=b, scale=delta.scale))
                layer.weight.add_(merged.to(layer.weight.dtype))
                add_weight_offset(delta, a, b)


def apply_relora(model: nn.Module, spec) -> nn.Module:
    every, warmup = spec.extra.get("relora_every"), int(spec.extra.get("relora_warmup", 5))
    if every is not None and (not isinstance(every, int) or every < 1):
        raise LoraError(f"relora_every={every!r} must be a positive number of optimizer steps")
    if warmup < 1:
        raise LoraError(f"relora_warmup={warmup!r} must be at least 1 step")
    model = apply_plain_lora(model, spec)
    model.train_hooks = ReLoraHooks(model, every, warmup)
    return model
