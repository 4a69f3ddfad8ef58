"""The frozen base resident in bf16 while training under bf16 autocast: the same math, no per-step cast.

Under ``torch.autocast(dtype=bfloat16)`` every ``F.linear`` / ``conv`` casts its fp32 weight and bias to
bf16 on every call. autocast caches those casts only for weights that require grad, so a frozen
weight is read in fp32 and written in bf16 again at every forward, for every layer, every step.
Casting the frozen weights of those layers to bf16 once gives bit-identical products (autocast would
have cast them to exactly these values) and skips that traffic; the trainable parameters (LoRA
factors, the head) stay fp32, so updates are not lost to bf16 rounding.

Only weights autocast would cast are touched: those of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and LoRA
linear layers. A parameter also held by another module (a language-model head tied to the token
embedding, which autocast does not cast) stays fp32, so embeddings and the residual stream keep
their precision. ``frozen_in_dtype`` keeps the fp32 originals and puts them back on exit, so a merge,
a save or an fp32 evaluation afterwards sees the weights it had before.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from lorakit.layers.linear import LoraLinear
from lorakit.methods.hooks import NO_HOOKS, hooks_of

_CAST_BY_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, LoraLinear)


def castable_frozen_params(model: nn.Module) -> list[nn.Parameter]:
    """Frozen fp32 weights and biases of layers whose autocast op casts them, not shared elsewhere."""
    owners: dict[int, list[nn.Module]] = {}
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
            params[id(p)] = p
    return [p for key, p in params.items()
            if not p.requires_grad and p.dtype == torch.float32
            and all(isinstance(m, _CAST_BY_AUTOCAST) for m in owners[key])]


@contextmanager
def frozen_in_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16):
    """Inside the block the frozen weights autocast would cast are stored in ``dtype``; on exit the
    fp32 originals are restored (the same tensors, untouched)."""
    kept = [(p, p.data) for p in castable_frozen_params(model)]
    for p, data in kept:
        p.data = data.to(dtype)
    try:
        yield len(kept)
    finally:
        for p, data in kept:
            p.data = data


def resident_base(model: nn.Module, precision: str, sharded: bool = False):
    """What training under ``precision`` uses: ``frozen_in_dtype(model, bf16)`` for bf16, else a no-op.
    Not for sharded (FSDP) runs, whose parameters are shards, nor for methods with training hooks
    (ReLoRA merges into the frozen weights during the run)."""
    if precision == "bf16" and not sharded and hooks_of(model) is NO_HOOKS:
        return frozen_in_dtype(model, torch.bfloat16)
    return nullcontext(0)
