"""LoRA on an ``nn.Embedding`` (PEFT's layout and init).

    h = W0[x] + s * A^T[x] B^T        W0: (num, dim), A: (r, num), B: (dim, r)
    dW = s * (B A)^T                  shaped (num, dim) like W0

A is the lookup table here, so the init swaps roles: A = 0 and B random (still dW = 0 at the start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer, LowRankDelta


class LoraEmbedding(LoraLayer):
    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.lookup = dict(padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, **self.lookup)

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        # No dropout on token ids; PEFT skips it for embeddings too.
        rows = F.embedding(x, delta.A.t(), padding_idx=self.lookup["padding_idx"])
        return delta.scale * (rows @ delta.B.t())

    def delta_weight(self, delta: LowRankDelta) -> torch.Tensor:
        return delta.scale * (delta.B.detach().float() @ delta.A.detach().float()).t()

    def factor_shapes(self, r: int):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def init_factors(self, delta: LowRankDelta, init: str) -> None:
        with torch.no_grad():
            nn.init.zeros_(delta.A)
            nn.init.normal_(delta.B)

    def describe_base(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"
