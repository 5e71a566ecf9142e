"""Items anywhere (data.layout=scatter): 1-4 items at free positions on a larger canvas, combined by their
maximum (the minimum on a light background), the boxes of two items overlapping by at most a quarter of an item,
with optional clutter (fragments of other items); and a split of multi-label pictures (a user's CSV)."""
from __future__ import annotations

import torch

from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import DrawnSource, add_repeats, targets
from cnnrnn.data.items import Split
from cnnrnn.data.loader import ItemSource

OVERLAP = 0.25  # of an item's area, at most, between two items' boxes


def overlaps(corners: torch.Tensor, present: torch.Tensor, side: int) -> torch.Tensor:
    """(n,) whether two present items' boxes (n, M, 2 top-left corners of side x side) overlap by more than
    OVERLAP of an item's area."""
    d = (corners[:, :, None] - corners[:, None]).abs()                           # (n, M, M, 2)
    area = (side - d).clamp(min=0).prod(-1)                                       # (n, M, M) shared pixels
    both = present[:, :, None] & present[:, None]
    both &= ~torch.eye(corners.shape[1], dtype=torch.bool)
    return ((area > OVERLAP * side * side) & both).flatten(1).any(1)


class ScatterSource(DrawnSource):
    """Scattered composites of one split: {'image': (B, C, P, P) uint8, 'cells': (B, M) the class of each item
    (-1: none), 'boxes': (B, M, 2) their top-left corners (items are S x S), 'labels', 'counts'}, the items sorted
    in reading order of their corners. Layouts are drawn from CPU generators as CompositeSource draws them."""

    def __init__(self, split: Split, size: int, canvas: int, min_items: int, max_items: int, seed: int,
                 fixed: bool = False, augment: Augment | None = None, repeats: float = 0.0, clutter: int = 0,
                 background: tuple[int, ...] = (0,), classes: int = 10):
        self.split, self.size, self.canvas, self.seed = split, size, canvas, seed
        self.min_items, self.max_items, self.augment, self.repeats = min_items, max_items, augment, repeats
        self.clutter, self.background, self.classes = clutter, background, classes
        self.side, self.labels = split.images.shape[-1], split.labels.cpu()
        self.fixed_layout = self._layout(seed) if fixed else None

    def _layout(self, seed: int) -> torch.Tensor:
        """(N, M, 3 + 3*clutter) per item slot: its item (-1: none), y, x; then the clutter's item, y, x."""
        g, n, m = torch.Generator().manual_seed(seed), self.size, self.max_items
        k = torch.randint(self.min_items, m + 1, (n, 1), generator=g)
        present = torch.arange(m) < k                                             # (N, M)
        items = torch.randint(0, len(self.split), (n, m), generator=g)
        if self.repeats:
            items = add_repeats(torch.where(present, items, -1), self.labels, self.repeats, g, self.classes)
        corners = torch.randint(0, self.canvas - self.side + 1, (n, m, 2), generator=g)
        bad = overlaps(corners, present, self.side)
        while bad.any():  # redraw the corners of the composites whose items overlap too much
            corners[bad] = torch.randint(0, self.canvas - self.side + 1, (int(bad.sum()), m, 2), generator=g)
            bad = overlaps(corners, present, self.side)
        key = torch.where(present, corners[..., 0] * self.canvas + corners[..., 1], self.canvas ** 2)
        order = key.argsort(1)                                                    # reading order, empty slots last
        items = torch.where(present, items, -1).gather(1, order)
        corners = corners.gather(1, order[..., None].expand(-1, -1, 2))
        rows = [items[..., None], corners]
        if self.clutter:
            rows.append(torch.randint(0, len(self.split), (n, m, self.clutter), generator=g))
            rows.append(torch.randint(0, self.canvas - self.side // 3 + 1, (n, m, 2 * self.clutter), generator=g))
        return torch.cat(rows, -1)

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        """The composites of layout rows (B, M, 3 + 3*clutter), made on the split's device."""
        at = rows.to(self.split.images.device)
        slots, corners = at[..., 0], at[..., 1:3]
        present = slots >= 0
        items = self.split.images[slots.clamp(min=0)]                            # (B, M, C, S, S)
        if self.augment is not None:
            items[present] = self.augment(items[present], key)
        canvas = place(items, corners, present, self.canvas, self.background)
        if self.clutter:  # fragments of a third of an item's side, from random items, at random places
            f, n_c = self.side // 3, self.clutter
            frag = self.split.images[at[..., 3:3 + n_c].flatten(1)][..., f:2 * f, f:2 * f]   # (B, M*n, C, f, f)
            spots = at[..., 3 + n_c:].reshape(len(at), -1, 2)                    # (B, M*n, 2)
            canvas = place(frag, spots, torch.ones_like(spots[..., 0], dtype=torch.bool), self.canvas,
                           self.background, canvas)
        return {"image": canvas, **targets(slots, self.split.labels, self.classes), "boxes": corners}


def place(items: torch.Tensor, corners: torch.Tensor, present: torch.Tensor, canvas: int,
          background: tuple[int, ...], onto: torch.Tensor | None = None) -> torch.Tensor:
    """Items (B, M, C, S, S) at their top-left corners (B, M, 2) on canvases (B, C, P, P) of the background tone
    (or `onto`), combined by the maximum (the minimum on a light background); absent items leave it as it is."""
    b, _, c, s = items.shape[:4]
    light = sum(background) / len(background) > 127
    if onto is None:
        onto = items.new_tensor(background).view(1, c, 1, 1).expand(b, c, canvas, canvas).contiguous()
    r = torch.arange(s, device=items.device)
    y, x = corners[..., 0, None] + r, corners[..., 1, None] + r                  # (B, M, S)
    flat = (y[..., :, None] * canvas + x[..., None, :]).flatten(1)               # (B, M*S*S) pixel indices
    values = torch.where(present[:, :, None, None, None], items, onto.new_tensor(background).view(1, 1, c, 1, 1))
    values = values.permute(0, 2, 1, 3, 4).reshape(b, c, -1)                      # (B, M, C, S, S) -> (B, C, M*S*S)
    out = onto.reshape(b, c, -1).clone()
    out.scatter_reduce_(2, flat[:, None].expand(-1, c, -1), values, "amin" if light else "amax")
    return out.view(b, c, canvas, canvas)


class PictureSource(ItemSource):
    """Multi-label pictures of a split (a user's CSV): {'image': (B, C, P, P) uint8, 'labels': (B, K) the set,
    'counts': (B, K)}; a training source draws a fresh order (and augmentation) each epoch."""

    def order(self, epoch: int | None) -> torch.Tensor:
        return torch.arange(len(self.split)) if self.fixed else super().order(epoch)

    def batch(self, rows: torch.Tensor, key: int = 0) -> dict[str, torch.Tensor]:
        batch = super().batch(rows, key)
        return {"image": batch["image"], "labels": batch["label"], "counts": batch["label"]}
