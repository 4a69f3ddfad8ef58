"""TrainHooks: the few places where a method may change the training loop.

Most methods only decide *which* parameters train (methods/). A few also change *how* they train:

    lora-plus  B factors at ratio * lr                        -> param_groups
    galore     a projected-gradient optimizer                 -> make_optimizer
    relora     jagged lr restarts, periodic merge + re-init   -> lr_factor, after_step
    adalora    importance from gradients, rank reallocation   -> after_backward, after_step

A method attaches one object to the model (``model.train_hooks = MyHooks(...)``); the loop calls it at
fixed points. Every hook has a do-nothing default, so a method overrides only what it needs. Hooks that
keep state across steps return it from ``state_dict`` so checkpoints (and --resume) carry it.
"""

from __future__ import annotations

from torch import nn


class TrainHooks:
    def param_groups(self, model: nn.Module, settings, groups: list[dict]) -> list[dict]:
        """Change the optimizer's parameter groups (each a dict with "params" and "lr")."""
        return groups

    def make_optimizer(self, groups: list[dict], settings):
        """Return an optimizer to use instead of AdamW/SGD, or None for the default."""
        return None

    def lr_factor(self, step: int, factor: float) -> float:
        """The lr multiplier at ``step`` given the schedule's own ``factor``."""
        return factor

    def after_backward(self, step: int, model: nn.Module) -> None:
        """Gradients of this step are in ``.grad`` (after accumulation, before clipping)."""

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        """After optimizer.step() of 0-based ``step``, before gradients are cleared."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


NO_HOOKS = TrainHooks()


def hooks_of(model: nn.Module) -> TrainHooks:
    """The hooks a method attached, or the do-nothing default."""
    inner = getattr(model, "module", model)          # DDP / compiled wrappers keep the module inside
    return getattr(inner, "train_hooks", None) or NO_HOOKS
