"""Mixed-adapter batches: each batch row goes through its own adapter, in one gathered matmul.

Serving many adapters on one base (S-LoRA / Punica's BGMV) needs no Python loop over adapters: the
factors of the n adapters are stacked once per forward, slot 0 being the bare base (zeros), each row
gathers its own slot, and two batched matmuls apply them:

    A_stack: (n + 1, r_max, in)      B_stack: (n + 1, r_max, out) = (s B)^T, zero padded
    idx:     (b,)  slot of each row (0 = base)
    gathered: x: (b, t, in) -> h = bmm(x, A_stack[idx]^T): (b, t, r_max)
              -> y = bmm(h, B_stack[idx]): (b, t, out)
    dense:    h = x A_cat^T: (b, t, n r_max), A_cat = A_stack[1:] as (n r_max, in); keep each row's own
              r_max columns (mask M[i, j] = 1 iff column j belongs to slot idx_i); y = (h * M) B_cat,
              B_cat = B_stack[1:] as (n r_max, out)

The gathered form copies one (r, in) and one (r, out) factor per row; the dense form does n times the
low-rank FLOPs but no copies. When decoding (t = 1) with a handful of adapters the copies cost more:
measured on SmolLM2's MLP shape (576 -> 1536, b = 32, r = 8, one thread) the gather took 490 us whatever
n, the dense form 24 us for n = 1, 171 us for n = 8, 567 us for n = 32; for a 40-token prefill the
dense form is cheaper only for n = 1. So the dense form is used when t n <= t + DENSE_BREAK_EVEN.

Adapters of smaller rank are zero-padded to r_max, which adds nothing to the product. Dropout is not
applied: mixed batches serve inference (``adapters.set_row_adapters`` refuses training with dropout).
In inference (no autograd) a layer reuses its stacks while no factor changed (``cached_stacks``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lorakit.errors import LoraError


DENSE_BREAK_EVEN = 16


def stack_factors(lora, names: tuple, in_features: int, out_features: int, device):
    """(A_stack, B_stack) for ``names`` (slot i + 1); a name the layer lacks gets a zero slot."""
    deltas = [lora[n] if n in lora else None for n in names]
    r_max = max([d.r for d in deltas if d is not None], default=1)
    zeros_a = torch.zeros(r_max, in_features, device=device)
    zeros_b = torch.zeros(r_max, out_features, device=device)
    a_list, b_list = [zeros_a], [zeros_b]
    for d in deltas:
        if d is None:
            a_list.append(zeros_a)
            b_list.append(zeros_b)
        else:
            a_list.append(F.pad(d.A, (0, 0, 0, r_max - d.r)))              # pad rows of A
            b_list.append(F.pad((d.B * d.scale).t(), (0, 0, 0, r_max - d.r)))   # rows of (sB)^T
    return torch.stack(a_list), torch.stack(b_list)


class RowStacks(NamedTuple):
    """What ``cached_stacks`` keeps on a layer: the stacks and what they were built from."""
    names: tuple
    device: torch.device
    deltas: list                # each name's delta module (None: the layer lacks it)
    scales: list                # each delta's scale then
    versions: list              # (factor tensor, its in-place version counter then)
    stacks: tuple               # (A_stack, B_stack)

    def still_valid(self, names: tuple, device, modules: dict) -> bool:
        return (self.names == names and self.device == device
                and all(modules.get(n) is d for n, d in zip(names, self.deltas))
                and all(d is None or d.scale == sc for d, sc in zip(self.deltas, self.scales))
                and all(t._version == v for t, v in self.versions))


def cached_stacks(layer, names: tuple, device):
    """``stack_factors`` for ``layer``, rebuilt only when a factor changed (inference only: with
    autograd on, fresh stacks keep the graph to A and B). The cache remembers each name's delta object,
    its scale, and each factor tensor with its in-place version counter, so loading, training or
    replacing an adapter invalidates it. The check reads plain dicts (``_modules``, ``_parameters``),
    not ``nn.Module.__getattr__``: it runs on every layer of every decoding step."""
    if torch.is_grad_enabled():
        return stack_factors(layer.lora, names, layer.in_features, layer.out_features, device)
    modules = layer.lora._modules
    cached = layer.__dict__.get("_row_stacks")
    if cached is not None and cached.still_valid(names, device, modules):
        return cached.stacks
    deltas = [modules.get(n) for n in names]
    tensors = [t for d in deltas if d is not None for t in (d._parameters["A"], d._parameters["B"])]
    stacks = stack_factors(layer.lora, names, layer.in_features, layer.out_features, device)
    layer.__dict__["_row_stacks"] = RowStacks(names, device, deltas,
                                              [None if d is None else d.scale for d in deltas],
                                              [(t, t._version) for t in tensors], stacks)
    return stacks


def mixed_lora_delta(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """Per-row low-rank term s_i B_i A_i x_i for x: (b, ..., in); returns (b, ..., out)."""
    rows = x.shape[0]
    if index.numel() != rows:
        raise LoraError(f"mixed-adapter batch: {index.numel()} adapter names were set but the input has "
                        f"{rows} rows (shape {tuple(x.shape)}); give one name per batch row")
    h = x.reshape(rows, -1, x.shape[-1]).to(a_stack.dtype)                 # (b, t, in)
    slots, r, tokens = a_stack.shape[0] - 1, a_stack.shape[1], h.shape[1]
    if slots == 0:                                                         # every row is the base
        return x.new_zeros(*x.shape[:-1], b_stack.shape[2])
    if slots * tokens <= tokens + DENSE_BREAK_EVEN:
        mask = _row_mask(index, slots, r, h.dtype)                         # (b, n r)
        y = (h @ a_stack[1:].reshape(slots * r, -1).t()) * mask[:, None, :]
        y = y @ b_stack[1:].reshape(slots * r, -1)                         # (b, t, out)
    else:
        a = a_stack.index_select(0, index)                                 # (b, r, in)
        b = b_stack.index_select(0, index)                                 # (b, r, out)
        y = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b)                  # (b, t, out)
    return y.reshape(*x.shape[:-1], b_stack.shape[2])


_MASKS: dict = {}


def _row_mask(index: torch.Tensor, slots: int, r: int, dtype) -> torch.Tensor:
    """M (b, n r): M[i, j] = 1 iff column j (slot j // r + 1) is row i's slot. Every layer of one mixed
    batch shares ``index``, so the mask is built once per (index, n, r, dtype), not once per layer."""
    if torch.compiler.is_compiling():       # a traced graph builds it once anyway
        return _build_mask(index, slots, r, dtype)
    key = (id(index), index._version, slots, r, dtype, index.device)
    entry = _MASKS.get(key)
    if entry is None or entry[0] is not index:
        if len(_MASKS) > 8:                 # one mixed batch at a time in practice: keep it small
            _MASKS.clear()
        entry = _MASKS[key] = (index, _build_mask(index, slots, r, dtype))
    return entry[1]


def _build_mask(index: torch.Tensor, slots: int, r: int, dtype) -> torch.Tensor:
    column_slot = torch.arange(slots * r, device=index.device) // r + 1
    return (column_slot[None, :] == index[:, None]).to(dtype)
