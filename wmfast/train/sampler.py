"""Deterministic, resumable sharding of a map-style dataset over ranks, steps and micro-batches.

Sample order: the concatenation of per-epoch permutations (epoch e shuffled by a generator seeded with
seed + e). Optimizer step s consumes the global positions [s*G, (s+1)*G) of that order (G = global batch);
rank r takes the contiguous slice [s*G + r*P, s*G + (r+1)*P) (P = G / world) and cuts it into micro-batches.
So the data position is just the step: a resumed run sees exactly the samples the uninterrupted run saw,
and the samples of a step do not depend on the micro-batch size (only their grouping does).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class StepBatchSampler:
    """Yields the index lists of this rank's micro-batches for steps start_step .. steps-1 (a DataLoader
    `batch_sampler`)."""

    def __init__(self, length: int, global_batch: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int, steps: int):
        if length <= 0:
            raise ValueError("the training dataset is empty")
        self.length, self.global_batch, self.micro_batch = length, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_step, self.steps = start_step, steps
        self.per_rank = global_batch // world_size
        self._perm_epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.length, generator=g), epoch
        return int(self._perm[offset])

    def step_indices(self, step: int) -> list[list[int]]:
        base = step * self.global_batch + self.rank * self.per_rank
        flat = [self._index(base + i) for i in range(self.per_rank)]
        return [flat[i:i + self.micro_batch] for i in range(0, self.per_rank, self.micro_batch)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield from self.step_indices(step)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * (self.per_rank // self.micro_batch)


def val_batches(length: int, micro_batch: int, rank: int, world_size: int, max_batches: int) -> list[list[int]]:
    """The first max_batches x world micro-batches of the val split in order, dealt round-robin to ranks; every
    rank gets the same number of batches (ZeRO-3 forwards are collective)."""
    per_rank = min(max_batches, length // (micro_batch * world_size))
    out = []
    for b in range(per_rank):
        start = (b * world_size + rank) * micro_batch
        out.append(list(range(start, start + micro_batch)))
    return out
