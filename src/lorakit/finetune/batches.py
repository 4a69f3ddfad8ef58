"""Token batches for the training loop, with little padding: packing or length-grouped batches.

The loop (train/loop.py) asks ``data.batch_indices(n, batch_size, seed, position)`` for the rows of a
step and ``data.take(rows)`` for their tensors; both are a function of (seed, position), so --resume
continues the same order.

    padded (default): rows are examples. Each epoch is shuffled, cut into "mega-batches" of 50
        batches, each sorted by length and cut into batches (the length grouping of Hugging Face's
        LengthGroupedSampler); the batches are then shuffled. A batch is padded to its own longest row.
    packed (--pack): examples are laid end to end into rows of max_seq_len (first-fit decreasing);
        ``position_ids`` restart at 0 for every example and no attention_mask is passed, so
        transformers builds a block-diagonal causal mask from the position resets (sdpa / eager
        attention; flash-attention's varlen path reads the same position_ids): attention never
        crosses an example boundary.

Rows of ``take``: input_ids (B, W), labels (B, W) [SFT] or (B,) [classification], and
attention_mask (B, W) [padded] or position_ids (B, W) [packed].
"""

from __future__ import annotations

import torch

from lorakit.finetune.encode import IGNORE, Encoded

MEGA_BATCH = 50


class TokenData:
    def __init__(self, encoded: Encoded, pad_id: int, pack: bool = False, max_len: int = 0,
                 sequence_labels: bool = True, group_by_length: bool = True):
        self.pad_id, self.packed, self.sequence_labels = pad_id, pack, sequence_labels
        self.group_by_length = group_by_length and not pack
        if pack:
            self.rows = _pack(encoded, max_len)
        else:
            self.rows = [(ids, labels, None) for ids, labels in zip(encoded.ids, encoded.labels)]
        self.lengths = [len(r[0]) for r in self.rows]
        self.examples = len(encoded)
        self.tokens_served = 0          # real (non-padding) tokens handed to the loop so far

    def __len__(self) -> int:
        return len(self.rows)

    def batch_indices(self, n: int, batch_size: int, seed: int, position: int) -> torch.Tensor:
        """Rows of the ``position``-th batch of an endless, seeded stream (drop-last per epoch)."""
        per_epoch = max(n // batch_size, 1)
        epoch, slot = divmod(position, per_epoch)
        return self.epoch_batches(batch_size, seed, epoch)[slot]

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(self.rows), generator=gen)
        if self.group_by_length:
            lengths = torch.tensor(self.lengths)
            chunks = order.split(batch_size * MEGA_BATCH)
            order = torch.cat([c[lengths[c].argsort(descending=True, stable=True)] for c in chunks])
        batches = list(order.split(batch_size))
        if len(batches) > 1 and len(batches[-1]) < batch_size:
            batches = batches[:-1]
        if self.group_by_length:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def take(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in index.tolist()]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (row_ids, _, _) in enumerate(rows):
            ids[b, :len(row_ids)] = torch.tensor(row_ids)
            mask[b, :len(row_ids)] = 1
        self.tokens_served += int(mask.sum())
        batch = {"input_ids": ids}
        if self.sequence_labels:
            labels = torch.full_like(ids, IGNORE)
            for b, (_, row_labels, _) in enumerate(rows):
                labels[b, :len(row_labels)] = torch.tensor(row_labels)
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([r[1] for r in rows])
        if self.packed:
            # padding continues the count (0, 1, 2, ... after the last example): a block of its own
            positions = torch.arange(width).repeat(len(rows), 1)
            for b, (_, _, pos) in enumerate(rows):
                positions[b, :len(pos)] = torch.tensor(pos)
                positions[b, len(pos):] = torch.arange(width - len(pos))
            batch["position_ids"] = positions
        else:
            batch["attention_mask"] = mask
        return batch

    def padding_fraction(self, batch_size: int, seed: int = 0) -> float:
        """Share of padding tokens among all token slots of one epoch's batches."""
        real = slots = 0
        for batch in self.epoch_batches(min(batch_size, len(self.rows)), seed, 0):
            lengths = [self.lengths[i] for i in batch.tolist()]
            real += sum(lengths)
            slots += max(lengths) * len(lengths)
        return 1 - real / max(slots, 1)


def _pack(encoded: Encoded, max_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """First-fit decreasing bin packing of examples into rows of at most ``max_len`` tokens."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded.ids[i]))
    bins: list[list[int]] = []
    space: list[int] = []
    for i in order:
        need = len(encoded.ids[i])
        for b, free in enumerate(space):
            if free >= need:
                bins[b].append(i)
                space[b] -= need
                break
        else:
            bins.append([i])
            space.append(max_len - need)
    rows = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            ids += encoded.ids[i]
            labels += encoded.labels[i]
            positions += list(range(len(encoded.ids[i])))
        rows.append((ids, labels, positions))
    return rows
