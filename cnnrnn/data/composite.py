"""Composite multi-label images: a grid x grid canvas of cells, each an item of one base split or empty (the data's
background tone)."""
from __future__ import annotations

import torch

from cnnrnn.data.augment import Augment
from cnnrnn.data.degrade import degrade, mix
from cnnrnn.data.items import Split
from cnnrnn.data.loader import epoch_seed
from cnnrnn.data.scene import Scene, item_of_class, label_statistics

# The largest picture a model reads: 16x16 cells (448x448 pixels of Fashion-MNIST). Beyond, one batch of pictures
# outgrows a laptop's memory; every size that enters (data.grid, evaluate --grid, predict's images) is checked.
MAX_GRID = 16


def sample_layout(n: int, n_items: int, grid: int, min_items: int, max_items: int,
                  generator: torch.Generator) -> torch.Tensor:
    """(n, grid*grid) base-item index per cell in reading order, -1 for an empty cell."""
    cells = grid * grid
    k = torch.randint(min_items, max_items + 1, (n, 1), generator=generator)
    # The rank of each cell in a random permutation; the k lowest-ranked cells are occupied.
    rank = torch.rand(n, cells, generator=generator).argsort(dim=1).argsort(dim=1)
    items = torch.randint(0, n_items, (n, cells), generator=generator)
    return torch.where(rank < k, items, torch.full_like(items, -1))


def add_repeats(layout: torch.Tensor, labels: torch.Tensor, p: float, generator: torch.Generator,
                num_classes: int) -> torch.Tensor:
    """Layouts (n, G*G) where each occupied cell after the first (reading order), with probability p, holds an
    item of the class of a random earlier occupied cell instead: composites that repeat classes (counting)."""
    n, cells = layout.shape
    occupied = layout >= 0
    cls = torch.where(occupied, labels[layout.clamp(min=0)], -1)
    repeat = torch.rand(n, cells, generator=generator) < p
    pick = torch.rand(n, cells, generator=generator)
    u = torch.rand(n, cells, generator=generator)
    changed = torch.zeros_like(occupied)
    for j in range(1, cells):
        earlier = cls[:, :j] >= 0                                                   # (n, j)
        source = pick[:, :j].masked_fill(~earlier, -1.0).argmax(dim=1)              # a random earlier item
        changed[:, j] = repeat[:, j] & occupied[:, j] & earlier.any(dim=1)
        cls[changed[:, j], j] = cls[changed[:, j], source[changed[:, j]]]
    swapped = item_of_class(labels, cls.clamp(min=0), u, num_classes)
    return torch.where(changed, swapped, layout)


def counts_of(cells: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) float number of cells holding each class among cells (B, G*G), -1 marking an empty cell."""
    counts = torch.zeros(len(cells), num_classes + 1, device=cells.device)
    counts.scatter_add_(1, torch.where(cells >= 0, cells, num_classes), torch.ones(cells.shape, device=cells.device))
    return counts[:, :num_classes]  # empty cells land in an extra column


def multi_hot(cells: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) float set of the distinct classes among cells (B, G*G), where -1 marks an empty cell."""
    return (counts_of(cells, num_classes) > 0).float()


def targets(layout: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """What composites of a layout (B, M) of item indices (-1: none) hold: 'cells' (B, M) their classes (-1: none),
    'labels' (B, C) the set, 'counts' (B, C) items per class."""
    cells = torch.where(layout >= 0, labels[layout.clamp(min=0)], -1)
    counts = counts_of(cells, num_classes)
    return {"cells": cells, "labels": (counts > 0).float(), "counts": counts}


def with_background(images: torch.Tensor, background: tuple[int, ...]) -> torch.Tensor:
    """Items (N, C, S, S) uint8 with an item of the background tone appended at index N (an empty cell), viewed
    as 4-byte words (N+1, C, S, S/4) where S allows: a row of 28 pixels moves as 7 words, 4x fewer to gather."""
    empty = images.new_tensor(background).view(1, -1, 1, 1).expand(1, *images.shape[1:])
    padded = torch.cat([images, empty])
    return padded.view(torch.int32) if images.shape[-1] % 4 == 0 else padded


def render(words: torch.Tensor, layout: torch.Tensor, grid: int) -> torch.Tensor:
    """Tile items, words = with_background(images), into canvases (B, C, grid*S, grid*S) uint8 by a layout
    (B, grid*grid) of item indices, -1 for an empty cell."""
    b, (c, side, width) = len(layout), words.shape[1:]
    idx = torch.where(layout >= 0, layout, len(words) - 1).flatten()  # empty cells take the background item
    tiles = words.index_select(0, idx).view(b, grid, grid, c, side, width)         # (B, G, G, C, S, W)
    canvas = tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid * side, grid * width)  # (B, C, G*S, G*W)
    return canvas.view(torch.uint8)                                               # (B, C, G*S, G*S)


def grid_boxes(rows: torch.Tensor, grid: int, side: int) -> torch.Tensor:
    """(B, G*G, 2) the top-left corner of each cell, for layouts rows (B, G*G): the boxes of a grid's items."""
    i = torch.arange(grid * grid, device=rows.device)
    return (torch.stack([i // grid, i % grid], -1) * side).expand(len(rows), -1, -1)


def cell_crops(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Canvases (B, C, G*S, G*S) cut back into their cells (B, G*G, C, S, S), in reading order."""
    b, c, side = len(images), images.shape[1], images.shape[-1] // grid
    cells = images.view(b, c, grid, side, grid, side)                                  # (B, C, G, S, G, S)
    return cells.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, side, side)      # (B, G*G, C, S, S)


class DrawnSource:
    """What composites of drawn layouts share: a fixed source (validation, test) draws its layouts once from
    `seed`, so every run and every model sees the same images; a training source draws new ones every epoch."""

    def __len__(self) -> int:
        return self.size

    def ids(self) -> list[str]:
        return [str(i) for i in range(self.size)]

    def order(self, epoch: int | None) -> torch.Tensor:
        if self.fixed_layout is not None:
            return self.fixed_layout
        return self._layout(epoch_seed(self.seed, 0 if epoch is None else epoch))


class CompositeSource(DrawnSource):
    """Composites of one split: {'image': (B, C, G*S, G*S) uint8, 'cells': (B, G*G), 'labels': (B, K) the set of
    the K classes, 'counts': (B, K) items per class}; empty cells have the data's background tone.

    `scene` (a Scene) decides which items go together (default: independent, uniform); `repeats` makes items
    repeat classes (see add_repeats); `degrade` corrupts every item (see data.degrade), the same way for a fixed
    image whatever batch it comes in.

    Batches are made on the split's device (Split.to): layouts and every random draw come from CPU generators
    (the same composites for a seed on any device; exact resume), then only the batch's layout rows move there.
    """

    def __init__(self, split: Split, size: int, grid: int, min_items: int, max_items: int, seed: int,
                 fixed: bool = False, augment: Augment | None = None, scene: Scene | None = None,
                 degrade: float = 0.0, repeats: float = 0.0, background: tuple[int, ...] = (0,), classes: int = 10):
        self.split, self.size, self.grid = split, size, grid
        self.min_items, self.max_items, self.seed, self.augment = min_items, max_items, seed, augment
        self.scene, self.degrade, self.repeats, self.background = scene, degrade, repeats, background
        self.classes = classes
        self.labels = split.labels.cpu()  # for the draws, which stay on the CPU whatever the split's device
        self.fixed_layout = self._layout(seed) if fixed else None
        # Built once, so that rendering only gathers; augmented or degraded batches pad their own items instead.
        self.words = with_background(split.images, background) if augment is None and not degrade else None

    def _layout(self, seed: int, n: int | None = None) -> torch.Tensor:
        """(n, G*G) layouts drawn from `seed` (n: the source's size)."""
        generator = torch.Generator().manual_seed(seed)
        n = self.size if n is None else n
        if self.scene is not None:
            layout = self.scene.sample(n, self.labels, self.grid, self.min_items, self.max_items, generator)
        else:
            layout = sample_layout(n, len(self.split), self.grid, self.min_items, self.max_items, generator)
        if self.repeats:  # only then: the draws of composites without repeats stay as they were
            layout = add_repeats(layout, self.labels, self.repeats, generator, self.classes)
        return layout

    def statistics(self, n: int, seed: int = 12345) -> dict:
        """Label statistics (data.scene.label_statistics) of n layouts drawn as this source draws them."""
        return label_statistics(targets(self._layout(seed, n), self.labels, self.classes)["labels"])

    def item_seeds(self, rows: torch.Tensor, key: int) -> torch.Tensor:
        """An int64 seed per occupied cell of layouts `rows`: a hash of the whole layout and the cell, so a
        composite's items degrade alike in any batch; training sources mix in the batch key as well."""
        h = torch.full((len(rows),), self.seed * 7919 + (0 if self.fixed_layout is not None else key + 1))
        for j in range(rows.shape[1]):
            h = mix(h * 31 + rows[:, j] + 2)
        cell = torch.arange(rows.shape[1]).expand_as(rows)
        return mix(h[:, None] * 131 + cell)[rows >= 0]

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        """The composites of layout rows (B, G*G) (CPU, from order()), made on the split's device."""
        at = rows.to(self.split.images.device)  # only the layouts travel; the items are there already
        layout, images = at, self.words
        if images is None:
            # Change only the items this batch places, then tile those: one item per occupied cell.
            occupied = at >= 0
            items = self.split.images[at[occupied]]
            if self.degrade:  # seeds hashed from the CPU rows, as always
                items = degrade(items, self.item_seeds(rows, key).to(at.device), self.degrade, self.background)
            if self.augment is not None:
                items = self.augment(items, key)
            layout = torch.full_like(at, -1)
            layout[occupied] = torch.arange(len(items), device=at.device)
            images = with_background(items, self.background)
        return {"image": render(images, layout, self.grid), **targets(at, self.split.labels, self.classes),
                "boxes": grid_boxes(at, self.grid, self.split.images.shape[-1])}


class MixedGridSource:
    """Training composites of several grid sizes: each batch of `batch_size` rows is one size, the sizes mixed
    across steps. The epoch's order holds, per row, the grid's index and its layout (padded with -1), all
    drawn from the epoch's seed, so any step can be replayed (exact resume), and every rank of a data-parallel
    run slices the same global batch, of one size."""

    def __init__(self, sources: list[CompositeSource], batch_size: int, seed: int):
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.size, self.split = sources[0].size, sources[0].split
        self.width = max(s.grid for s in sources) ** 2

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int | None) -> torch.Tensor:
        """(N, 1 + max cells): grid index per row (one per batch), then that grid's layout, -1 padded."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, 0 if epoch is None else epoch) + 1)
        n_batches = -(-self.size // self.batch_size)
        pick = torch.randint(len(self.sources), (n_batches,), generator=g).repeat_interleave(self.batch_size)
        pick = pick[: self.size]                                                       # (N,)
        rows = torch.full((self.size, 1 + self.width), -1, dtype=torch.long)
        rows[:, 0] = pick
        for i, src in enumerate(self.sources):
            layout = src.order(epoch)                                                  # (N, G*G)
            rows[pick == i, 1: 1 + layout.shape[1]] = layout[pick == i]
        return rows

    def statistics(self, n: int, seed: int = 12345) -> dict:
        return self.sources[-1].statistics(n, seed)

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        src = self.sources[int(rows[0, 0])]
        return src.batch(rows[:, 1: 1 + src.grid ** 2], key)


class CellFeatures:
    """Composites for a frozen reader: the layouts of `source` (a CompositeSource or MixedGridSource), each cell as
    the reader's features of its item, computed once (`feats` (N, D) of the source's items, `mirrored` (N, D) of
    their mirror images), an empty cell as those of a black cell (`blank` (D,)). {'feats': (B, G*G, D), 'cells',
    'labels', 'counts'}, no pixels. A training source takes an item's mirror image with probability `hflip`
    (drawn as Augment draws its flips); a fixed one gives both, as 'feats' and 'feats_flip' (test-time flips)."""

    def __init__(self, source, feats: torch.Tensor, mirrored: torch.Tensor, blank: torch.Tensor, hflip: float = 0.0,
                 fixed: bool = False):
        self.source, self.feats, self.mirrored, self.blank, self.hflip = source, feats, mirrored, blank, hflip
        self.seed, self.size, self.fixed = source.seed, len(source), fixed

    def __len__(self) -> int:
        return self.size

    def order(self, epoch: int | None) -> torch.Tensor:
        return self.source.order(epoch)

    def statistics(self, n: int, seed: int = 12345) -> dict:
        return self.source.statistics(n, seed)

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        source = self.source
        if isinstance(source, MixedGridSource):  # rows: the grid's index, then its layout
            source = source.sources[int(rows[0, 0])]
            rows = rows[:, 1: 1 + source.grid ** 2]
        at = rows.to(self.feats.device)
        occupied = at >= 0
        item = at[occupied]

        def cells_of(per_item: torch.Tensor) -> torch.Tensor:
            feats = self.blank.expand(*at.shape, -1).clone()                               # (B, G*G, D)
            feats[occupied] = per_item
            return feats

        batch = {**targets(at, source.split.labels, source.classes),
                 "boxes": grid_boxes(at, source.grid, source.split.images.shape[-1])}
        if self.fixed:
            return {"feats": cells_of(self.feats[item]), "feats_flip": cells_of(self.mirrored[item]), **batch}
        flip = (torch.rand(len(item), generator=torch.Generator().manual_seed(key)) < self.hflip).to(at.device)
        return {"feats": cells_of(torch.where(flip[:, None], self.mirrored[item], self.feats[item])), **batch}
