"""Batches by index gathers over tensors in memory: no per-item Dataset, no worker processes."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch

from cnnrnn.data.augment import Augment
from cnnrnn.data.degrade import degrade, mix
from cnnrnn.data.items import Split


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch's order and augmentation, so any epoch can be replayed (exact resume)."""
    return (seed * 1_000_003 + epoch * 7919) % 2**31


class Source(Protocol):
    """What batches() reads: single items, composites or a frozen reader's cell features."""
    seed: int

    def __len__(self) -> int: ...
    def order(self, epoch: int | None) -> torch.Tensor: ...
    def batch(self, rows: torch.Tensor, key: int) -> dict[str, torch.Tensor]: ...


class ItemSource:
    """Single items of a split: {'image': (B, C, S, S) uint8, 'label': (B,) int64}. With `degrade`, every item
    is corrupted (data.degrade): the same way each time for a fixed source, afresh per batch for training.
    Batches are made on the split's device (Split.to); orders and random draws stay on the CPU. A training source
    of `size` samples per epoch goes through its items in fresh permutations until it has that many."""

    def __init__(self, split: Split, seed: int = 0, augment: Augment | None = None, degrade: float = 0.0,
                 fixed: bool = True, size: int | None = None, background: tuple[int, ...] = (0,)):
        self.split, self.seed, self.augment, self.degrade, self.fixed = split, seed, augment, degrade, fixed
        self.size, self.background = size or len(split), background

    def __len__(self) -> int:
        return self.size

    def ids(self) -> list[str]:
        """What names each item in the natural order: its file (a user's data), else its index."""
        return self.split.files or [str(i) for i in range(len(self.split))]

    def order(self, epoch: int | None) -> torch.Tensor:
        """Item indices: fresh permutations per training epoch, the natural order when epoch is None."""
        if epoch is None:
            return torch.arange(len(self.split))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        rounds = -(-self.size // len(self.split))
        return torch.cat([torch.randperm(len(self.split), generator=g) for _ in range(rounds)])[:self.size]

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        """The batch of item indices `rows` (CPU, from order()), made on the split's device."""
        at = rows.to(self.split.images.device)  # only the B indices travel; the items are there already
        images = self.split.images[at]
        if self.degrade:
            salt = self.seed * 7919 + (0 if self.fixed else key + 1)
            images = degrade(images, mix(rows * 31 + salt).to(at.device), self.degrade, self.background)
        if self.augment is not None:
            images = self.augment(images, key)
        return {"image": images, "label": self.split.labels[at]}


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batches(source: Source, batch_size: int, *, epoch: int | None = None, start: int = 0, drop_last: bool = False,
            rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of batches from step `start`; with world > 1 each rank takes its share of every global batch."""
    order = source.order(epoch)
    key = epoch_seed(source.seed, epoch or 0)
    for step in range(start, num_batches(len(order), batch_size, drop_last)):
        rows = order[step * batch_size:(step + 1) * batch_size][rank::world]
        # Each rank's share gets its own key: with one key per step, item i of every rank would draw the same
        # flip, shift and corruption. One process (world 1) keeps the key it always had.
        yield source.batch(rows, key=((key * 10_007 + step) * world + rank) % 2**31)
