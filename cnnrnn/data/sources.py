"""The four sources of a run (train, fixed training items for the train curves, val, test): single items or
composites, from the data settings of a config."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cnnrnn.config import Data
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource, MixedGridSource
from cnnrnn.data.fashion_mnist import Split
from cnnrnn.data.loader import ItemSource, Source
from cnnrnn.data.scene import Scene


@dataclass
class Sources:
    train: Source       # drawn afresh (order, composites, augmentation) every epoch
    train_eval: Source  # fixed training items/composites, scored each epoch for the train curves
    val: Source
    test: Source


def augmentation(d: Data) -> Augment | None:
    return Augment(d.hflip, d.shift) if d.augment else None


def on_device(splits: dict[str, Split], device) -> dict[str, Split]:
    """Every split's items and labels put on `device` once: batches (gathers, composites, augmentation) are then
    made there, and only a batch's indices travel."""
    return splits if device is None else {name: split.to(device) for name, split in splits.items()}


def items(d: Data, seed: int, splits: dict[str, Split], device=None) -> Sources:
    splits = on_device(splits, device)
    n_eval = min(d.train_eval_size, len(splits["train"]))
    deg = dict(degrade=d.degrade)
    return Sources(ItemSource(splits["train"], seed, augmentation(d), fixed=False, **deg),
                   ItemSource(splits["train"].subset(torch.arange(n_eval)), d.seed + 3, **deg),
                   ItemSource(splits["val"], d.seed + 1, **deg), ItemSource(splits["test"], d.seed + 2, **deg))


def composites(d: Data, seed: int, batch_size: int, splits: dict[str, Split], scene: Scene | None = None,
               device=None) -> Sources:
    """Composite sources; the fixed ones (train_eval, val, test) are seeded by data.seed only: identical across
    runs, seeds and models."""
    splits = on_device(splits, device)

    def source(split: Split, size: int, grid: int, **kwargs) -> CompositeSource:
        # with mixed grids, a smaller grid holds at most one item per cell
        return CompositeSource(split, size, grid=grid, min_items=d.min_items, max_items=min(d.max_items, grid ** 2),
                               degrade=d.degrade, scene=scene, repeats=d.repeats, **kwargs)

    n_train, n_eval = d.epoch_size or len(splits["train"]), min(d.train_eval_size, len(splits["train"]))
    train = [source(splits["train"], n_train, g, seed=seed, augment=augmentation(d)) for g in d.grids]
    return Sources(train[0] if len(train) == 1 else MixedGridSource(train, batch_size, seed),
                   source(splits["train"], n_eval, d.test_grid, seed=d.seed + 3, fixed=True),
                   source(splits["val"], d.val_size, d.test_grid, seed=d.seed + 1, fixed=True),
                   source(splits["test"], d.test_size, d.test_grid, seed=d.seed + 2, fixed=True))
