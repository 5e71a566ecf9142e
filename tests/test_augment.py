"""Train-time augmentation: label-preserving, inside each item's cell, and replayed exactly by its seed."""
from __future__ import annotations

import torch
from conftest import make_composites

from cnnrnn.data.augment import Augment, shift
from cnnrnn.data.composite import cell_crops
from cnnrnn.data.items import Split
from cnnrnn.data.loader import batches

FULL = Augment(hflip=0.5, shift=2)


def split(n: int = 200) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 8:20] = torch.randint(60, 255, (n, 16, 12), dtype=torch.uint8, generator=g)
    return Split(images, torch.arange(n) % 10)


def test_flip_mirrors_about_half_the_items_and_replays_by_seed():
    items = torch.randint(0, 255, (400, 1, 28, 28), dtype=torch.uint8)
    out = Augment(hflip=0.5, shift=0)(items, seed=3)
    mirrored, kept = (out == items.flip(-1)).all(dim=(1, 2, 3)), (out == items).all(dim=(1, 2, 3))
    assert (mirrored | kept).all() and 150 < int(mirrored.sum()) < 250
    assert torch.equal(out, Augment(hflip=0.5, shift=0)(items, seed=3))
    assert not torch.equal(out, Augment(hflip=0.5, shift=0)(items, seed=4))


def test_shift_moves_each_item_within_its_bounds_with_the_background_coming_in():
    item = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    item[0, 0, 10:18, 10:18] = 200
    moved = shift(item.expand(300, 1, 28, 28), 2, torch.Generator().manual_seed(0))
    assert (moved.flatten(1).sum(1) == item.sum()).all()            # a box away from the border: nothing lost
    rows = moved[:, 0].amax(2).argmax(1) - 10                        # the box's first row, relative
    assert set(rows.tolist()) == {-2, -1, 0, 1, 2}
    edge = torch.full((4, 1, 28, 28), 9, dtype=torch.uint8)
    assert (shift(edge, 3, torch.Generator().manual_seed(1)) == 0).any()  # black comes in at the border
    rgb = torch.zeros(4, 3, 28, 28, dtype=torch.uint8)
    out = shift(rgb, 3, torch.Generator().manual_seed(1), background=(10, 20, 30))
    assert set(out[:, 2].unique().tolist()) == {0, 30}               # the tone of each channel comes in


def test_augmentation_keeps_every_label_and_cell_and_stays_inside_the_cells():
    plain = make_composites(split(), 64, grid=2, min_items=1, max_items=4, seed=1)
    augmented = make_composites(split(), 64, grid=2, min_items=1, max_items=4, seed=1, augment=FULL)
    layout = plain.order(0)
    a, b = plain.batch(layout, key=3), augmented.batch(layout, key=3)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["cells"], b["cells"])
    crops = cell_crops(b["image"], 2)
    assert crops[layout < 0].max() == 0                        # empty cells stay black: nothing crosses a border
    changed = (crops != cell_crops(a["image"], 2)).flatten(2).any(2)
    assert changed[layout >= 0].float().mean() > 0.9           # nearly every item is changed


def test_augmentation_replays_by_seed_and_step_so_a_resumed_run_sees_the_same_batches():
    src = make_composites(split(), 96, grid=2, min_items=1, max_items=4, seed=5, augment=FULL)
    first = [b["image"] for b in batches(src, 32, epoch=2)]
    resumed = [b["image"] for b in batches(src, 32, epoch=2, start=1)]
    assert all(torch.equal(x, y) for x, y in zip(first[1:], resumed))
    assert not torch.equal(first[0], first[1])
    other_epoch = [b["image"] for b in batches(src, 32, epoch=3)]
    assert not torch.equal(first[0], other_epoch[0])


def test_no_augmentation_and_an_empty_batch_leave_items_as_they_are():
    items = split(20).images
    assert torch.equal(Augment(hflip=0.0, shift=0)(items, seed=1), items)
    assert FULL(items[:0], seed=1).shape == (0, 1, 28, 28)
