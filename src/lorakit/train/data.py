"""In-memory datasets as dicts of equal-length tensors, and a seeded, resumable batch order.

Every task's data fits in memory here (at most tens of thousands of small examples), so batches are
plain index gathers: no DataLoader workers, nothing nondeterministic, and the position in the data is
just the step number (epoch e uses permutation seeded by (seed, e)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorData:
    tensors: dict[str, torch.Tensor]

    def __post_init__(self):
        sizes = {len(t) for t in self.tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(v) for k, v in self.tensors.items()} }")

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[index] for k, v in self.tensors.items()}

    def subset(self, n: int) -> "TensorData":
        return TensorData({k: v[:n] for k, v in self.tensors.items()})


def batch_indices(n: int, batch_size: int, seed: int, position: int) -> torch.Tensor:
    """Indices of the ``position``-th batch of an endless shuffled stream (drop-last per epoch)."""
    per_epoch = max(n // batch_size, 1)
    epoch, slot = divmod(position, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[slot * batch_size:(slot + 1) * batch_size]


def eval_batches(data: TensorData, batch_size: int):
    for start in range(0, len(data), batch_size):
        yield data.take(torch.arange(start, min(start + batch_size, len(data))))
