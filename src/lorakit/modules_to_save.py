"""Modules trained in full next to an adapter (``modules_to_save``, e.g. a new classifier head).

Each adapter gets its own copy, so switching adapters switches heads too; the original stays frozen
and is what ``disable_adapter()`` uses. Attribute reads fall through to the module in use, so code
that reads ``model.classifier.weight`` or ``out_features`` keeps working.
"""

from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.train(original.training)

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def in_use(self) -> nn.Module:
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.in_use()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Our own fields must never fall through (a half-built copy would recurse forever).
            if name.startswith("_") or name in _OWN:
                raise
            return getattr(self.in_use(), name)


_OWN = ("original_module", "modules_to_save", "active", "disabled")
