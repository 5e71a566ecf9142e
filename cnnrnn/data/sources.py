"""Where a run's items come from (data.source: Fashion-MNIST's files, a user's folder or CSV) and the four sources
of a run (train, fixed training items for the train curves, val, test): single items or composites."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cnnrnn.cache import Cache
from cnnrnn.config import Data
from cnnrnn.data import fashion_mnist, folder
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource, MixedGridSource
from cnnrnn.data.items import Format, Split
from cnnrnn.data.loader import ItemSource, Source
from cnnrnn.data.scatter import PictureSource, ScatterSource
from cnnrnn.data.scene import Scene
from cnnrnn.errors import UserError

# A user's small folder trains long enough and is validated on enough composites with the defaults: samples per
# training epoch and validation composites at least (Fashion-MNIST has more items than either).
EPOCH_FLOOR, VAL_FLOOR = 20_000, 2_000


@dataclass
class Sources:
    train: Source       # drawn afresh (order, composites, augmentation) every epoch
    train_eval: Source  # fixed training items/composites, scored each epoch for the train curves
    val: Source
    test: Source


def load(d: Data) -> tuple[dict[str, Split], Format]:
    """The {'train', 'val', 'test'} splits of data.source and what their items are."""
    if d.source == "fashion_mnist":
        return fashion_mnist.splits(d.root, d.val_size, d.limit, d.seed), fashion_mnist.FORMAT
    return folder.load(d)


def preview(d: Data) -> Format:
    """Before any work: the Format the data will have but for the statistics of their pixels (a user's folder or
    CSV listed and checked, and the cache of its pictures usable)."""
    if d.source == "fashion_mnist":
        return fashion_mnist.FORMAT
    if not Path(d.path).exists():
        raise UserError(f"data.path={d.path} does not exist; give the folder or the CSV file of your pictures.")
    listing = folder.listing_of(d)
    if d.cache:
        Cache(d.cache, "data.cache").check(folder.cache_key(d, listing))
    classes = tuple(sorted({label for labels in listing.labels for label in labels})) or ("none",)
    return Format(classes, d.size, d.channels, picture=d.picture_size if listing.pictures else 0)


def fingerprint(d: Data) -> str:
    """What names the items a run reads: the folder Fashion-MNIST's files are found in, or a digest of a user's
    files (their names, sizes and times of change, and the CSV)."""
    if d.source == "fashion_mnist":
        found, _ = fashion_mnist.locate(Path(d.root))
        return str((found["train-images-idx3-ubyte"].parent if found else Path(d.root)).resolve())
    return folder.fingerprint(d)


def has_items(d: Data) -> bool:
    """Whether the data are items of one class each (a reader can be trained on them), not multi-label pictures."""
    return d.source != "csv" or not folder.listing_of(d).pictures


def flips(d: Data, fmt: Format) -> float:
    """data.hflip, or where it is null the default of the data: flips only where a mirror image keeps its class."""
    return d.hflip if d.hflip is not None else 0.5 if fmt.flips else 0.0


def augmentation(d: Data, fmt: Format) -> Augment | None:
    return Augment(flips(d, fmt), d.shift, fmt.background) if d.augment else None


def on_device(splits: dict[str, Split], device) -> dict[str, Split]:
    """Every split's items and labels put on `device` once: batches (gathers, composites, augmentation) are then
    made there, and only a batch's indices travel."""
    return splits if device is None else {name: split.to(device) for name, split in splits.items()}


def floor(d: Data, n: int, least: int) -> int:
    return n if d.source == "fashion_mnist" else max(n, least)


def epoch_size(d: Data, n_train: int) -> int:
    return d.epoch_size or floor(d, n_train, EPOCH_FLOOR)


def singles(cls, d: Data, seed: int, splits: dict[str, Split], fmt: Format, **kwargs) -> Sources:
    """Sources of single items or pictures (cls: ItemSource or PictureSource): the training one goes through the
    split in fresh orders; the fixed ones are seeded by data.seed only."""
    train, n_eval = splits["train"], min(d.train_eval_size, len(splits["train"]))
    return Sources(cls(train, seed, augmentation(d, fmt), fixed=False, size=epoch_size(d, len(train)), **kwargs),
                   cls(train.subset(torch.arange(n_eval)), d.seed + 3, **kwargs),
                   cls(splits["val"], d.seed + 1, **kwargs), cls(splits["test"], d.seed + 2, **kwargs))


def drawn(d: Data, train: Source, make, splits: dict[str, Split]) -> Sources:
    """Sources of composites: `train`, and fixed ones made by make(split, size, seed=, fixed=True), seeded by
    data.seed only: identical across runs, seeds and models."""
    n_eval = min(d.train_eval_size, len(splits["train"]))
    n_val = d.val_composites or floor(d, len(splits["val"]), VAL_FLOOR)
    return Sources(train, make(splits["train"], n_eval, seed=d.seed + 3, fixed=True),
                   make(splits["val"], n_val, seed=d.seed + 1, fixed=True),
                   make(splits["test"], d.test_size, seed=d.seed + 2, fixed=True))


def items(d: Data, seed: int, splits: dict[str, Split], fmt: Format, device=None) -> Sources:
    return singles(ItemSource, d, seed, on_device(splits, device), fmt, degrade=d.degrade, background=fmt.background)


def composites(d: Data, seed: int, batch_size: int, splits: dict[str, Split], fmt: Format, scene: Scene | None = None,
               device=None) -> Sources:
    splits = on_device(splits, device)

    def source(split: Split, size: int, grid: int = d.test_grid, **kwargs) -> CompositeSource:
        # with mixed grids, a smaller grid holds at most one item per cell
        return CompositeSource(split, size, grid, d.min_items, min(d.max_items, grid ** 2), degrade=d.degrade,
                               scene=scene, repeats=d.repeats, background=fmt.background, classes=len(fmt.classes),
                               **kwargs)

    n_train = epoch_size(d, len(splits["train"]))
    train = [source(splits["train"], n_train, g, seed=seed, augment=augmentation(d, fmt)) for g in d.grids]
    return drawn(d, train[0] if len(train) == 1 else MixedGridSource(train, batch_size, seed), source, splits)


def pictures(d: Data, seed: int, splits: dict[str, Split], fmt: Format, device=None) -> Sources:
    """Sources of whole pictures: a user's multi-label pictures (fmt.picture), or items scattered on a canvas
    (data.layout=scatter)."""
    splits = on_device(splits, device)
    if fmt.picture:
        return singles(PictureSource, d, seed, splits, fmt)

    def source(split: Split, size: int, **kwargs) -> ScatterSource:
        return ScatterSource(split, size, d.picture_size, d.min_items, d.max_items, repeats=d.repeats,
                             clutter=d.clutter, background=fmt.background, classes=len(fmt.classes), **kwargs)

    n_train = epoch_size(d, len(splits["train"]))
    return drawn(d, source(splits["train"], n_train, seed=seed, augment=augmentation(d, fmt)), source, splits)
