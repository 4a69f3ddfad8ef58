"""Mixed-adapter batches: each batch row goes through its own adapter, in one gathered matmul.

Serving many adapters on one base (S-LoRA / Punica's BGMV) needs no Python loop over adapters: the
factors of the n adapters are stacked once per forward, slot 0 being the bare base (zeros), each row
gathers its own slot, and two batched matmuls apply them:

    A_stack: (n + 1, r_max, in)      B_stack: (n + 1, out, r_max), scale folded into B, zero padded
    idx:     (b,)  slot of each row (0 = base)
    x: (b, t, in)  ->  h = bmm(x, A_stack[idx]^T): (b, t, r_max)  ->  y = bmm(h, B_stack[idx]^T): (b, t, out)

Adapters of smaller rank are zero-padded to r_max, which adds nothing to the product. Dropout is not
applied: mixed batches serve inference (``adapters.set_row_adapters`` refuses training with dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import LoraError


def stack_factors(lora, names: tuple, in_features: int, out_features: int, device):
    """(A_stack, B_stack) for ``names`` (slot i + 1); a name the layer lacks gets a zero slot."""
    deltas = [lora[n] if n in lora else None for n in names]
    r_max = max([d.r for d in deltas if d is not None], default=1)
    zeros_a = torch.zeros(r_max, in_features, device=device)
    zeros_b = torch.zeros(out_features, r_max, device=device)
    a_list, b_list = [zeros_a], [zeros_b]
    for d in deltas:
        if d is None:
            a_list.append(zeros_a)
            b_list.append(zeros_b)
        else:
            a_list.append(F.pad(d.A, (0, 0, 0, r_max - d.r)))              # pad rows of A
            b_list.append(F.pad(d.B * d.scale, (0, r_max - d.r)))          # pad columns of B
    return torch.stack(a_list), torch.stack(b_list)


def mixed_lora_delta(x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
    """Per-row low-rank term s_i B_i A_i x_i for x: (b, ..., in); returns (b, ..., out)."""
    rows = x.shape[0]
    if index.numel() != rows:
        raise LoraError(f"mixed-adapter batch: {index.numel()} adapter names were set but the input has "
                        f"{rows} rows (shape {tuple(x.shape)}); give one name per batch row")
    h = x.reshape(rows, -1, x.shape[-1]).to(a_stack.dtype)                 # (b, t, in)
    a = a_stack.index_select(0, index)                                     # (b, r, in)
    b = b_stack.index_select(0, index)                                     # (b, out, r)
    y = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))     # (b, t, out)
    return y.view(*x.shape[:-1], b.shape[1])
