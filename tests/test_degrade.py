"""Degraded items: off at zero, stronger with the strength, the same for a fixed image in any batch."""
from __future__ import annotations

import torch
from conftest import make_composites

from cnnrnn.data.composite import cell_crops
from cnnrnn.data.degrade import degrade, uniform
from cnnrnn.data.items import Split
from cnnrnn.data.loader import ItemSource


def random_split(n: int = 100) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def test_degrade_is_off_at_zero_and_fixed_per_image_for_val_and_test():
    split = random_split()
    clean = make_composites(split, 40, seed=2, fixed=True)
    assert torch.equal(degrade(split.images, torch.arange(100), 0.0), split.images)
    fixed = make_composites(split, 40, seed=2, fixed=True, degrade=0.5)
    layout = fixed.order(None)
    whole = fixed.batch(layout, key=1)["image"]
    parts = torch.cat([fixed.batch(layout[:13], key=7)["image"], fixed.batch(layout[13:], key=9)["image"]])
    assert torch.equal(whole, parts)                                  # any batching, any key: the same image
    assert not torch.equal(whole, clean.batch(layout)["image"])
    empty = cell_crops(whole, 2)[layout < 0]
    assert empty.max() == 0                                           # empty cells stay black
    train = make_composites(split, 40, seed=2, degrade=0.5)
    rows = train.order(0)
    assert not torch.equal(train.batch(rows, key=1)["image"], train.batch(rows, key=2)["image"])
    assert torch.equal(train.batch(rows, key=1)["image"], train.batch(rows, key=1)["image"])


def test_degraded_single_items_are_fixed_for_evaluation_and_drawn_afresh_for_training():
    split = random_split()
    items = ItemSource(split, seed=3, degrade=0.5)
    assert torch.equal(items.batch(torch.arange(10))["image"], items.batch(torch.arange(10), key=5)["image"])
    assert not torch.equal(items.batch(torch.arange(10))["image"], split.images[:10])
    train = ItemSource(split, seed=3, degrade=0.5, fixed=False)
    assert not torch.equal(train.batch(torch.arange(10), key=1)["image"], train.batch(torch.arange(10), key=2)["image"])


def test_degrade_strength_hides_more_of_the_item():
    items = torch.full((200, 1, 28, 28), 200, dtype=torch.uint8)
    diffs = [(degrade(items, torch.arange(200), s).float() - 200).abs().mean() for s in (0.2, 0.5, 0.9)]
    assert diffs[0] < diffs[1] < diffs[2]


def test_hashed_uniforms_are_spread_and_independent_per_stream():
    u = uniform(torch.arange(20_000), 1)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, uniform(torch.arange(20_000), 2))
    assert torch.equal(u, uniform(torch.arange(20_000), 1))
