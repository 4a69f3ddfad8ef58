"""LoRA on an ``nn.Embedding`` (PEFT's layout and init).

    h = W0[x] + s * A^T[x] B^T        W0: (num, dim), A: (r, num), B: (dim, r)
    dW = s * (B A)^T                  shaped (num, dim) like W0

A is the lookup table here, so the init swaps roles: A = 0 and B random (still dW = 0 at the start).
Token ids get no dropout (PEFT skips it too). DoRA (layers/dora.py) learns one magnitude per embedding
dimension: the norm of each column of W0 + s dW, over all tokens (PEFT's DoraEmbeddingLayer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer, LowRankDelta
from lorakit.layers.dora import DoraDelta


class LoraEmbedding(LoraLayer):
    dropout_on_input = False

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.lookup = dict(padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, **self.lookup)

    def low_rank(self, h: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        return F.embedding(h, delta.A.t(), padding_idx=self.lookup["padding_idx"]) @ delta.B.t()

    def lora_forward(self, x: torch.Tensor, delta: LowRankDelta) -> torch.Tensor:
        return delta.scale * self.low_rank(x, delta)          # no dropout on token ids

    def frozen_forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.embedding(h, self.weight, **self.lookup)

    def weight_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()                                      # (dim, num): a row per embedding dim

    def row_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(1, -1)

    def delta_class(self, dora: bool) -> type[LowRankDelta]:
        return DoraDelta if dora else LowRankDelta

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
