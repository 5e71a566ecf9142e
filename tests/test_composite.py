"""Composite images: canvas, black empty cells, label sets, split isolation, fixed val/test composites."""
from __future__ import annotations

import torch

from cnnrnn.config import Config, Data
from cnnrnn.build import sources
from cnnrnn.data import fashion_mnist as fm
from cnnrnn.data.composite import CompositeSource, cell_crops, multi_hot, render, sample_layout, with_black
from cnnrnn.data.fashion_mnist import Split


def numbered_split(n: int, offset: int = 0) -> Split:
    """Items whose pixels all equal (index + offset) % 250 + 1: every item is identifiable and never black."""
    values = (torch.arange(n) + offset) % 250 + 1
    return Split(values[:, None, None].expand(n, 28, 28).to(torch.uint8).clone(), torch.arange(n) % 10)


def test_layout_respects_counts_and_distinct_cells():
    layout = sample_layout(2000, 50, 3, 2, 5, torch.Generator().manual_seed(0))
    k = (layout >= 0).sum(1)
    assert layout.shape == (2000, 9) and k.min() == 2 and k.max() == 5
    assert set(k.tolist()) == {2, 3, 4, 5}  # every count occurs
    assert layout.max() < 50


def test_canvas_cells_hold_the_placed_items_and_empty_cells_are_black():
    split = numbered_split(40)
    src = CompositeSource(split, size=64, grid=2, min_items=1, max_items=4, seed=3, fixed=True)
    batch = src.batch(src.order(None))
    assert batch["image"].shape == (64, 56, 56) and batch["image"].dtype == torch.uint8
    layout = src.order(None)
    cells = cell_crops(batch["image"], 2)
    for b in range(64):
        for c in range(4):
            item = int(layout[b, c])
            if item < 0:
                assert cells[b, c].max() == 0
                assert batch["cells"][b, c] == -1
            else:
                assert torch.equal(cells[b, c], split.images[item])
                assert batch["cells"][b, c] == split.labels[item]
        placed = {int(split.labels[i]) for i in layout[b] if i >= 0}
        assert set(batch["labels"][b].nonzero().flatten().tolist()) == placed


def test_render_and_cell_crops_invert_each_other():
    split = numbered_split(30)
    layout = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8]])
    canvas = render(with_black(split.images), layout, 3)
    assert canvas.shape == (1, 84, 84)
    assert canvas[0, 0, 28] == split.images[1, 0, 0] and canvas[0, 28, 0] == split.images[3, 0, 0]
    assert torch.equal(cell_crops(canvas, 3)[0], split.images[:9])


def test_multi_hot_counts_each_class_once():
    hot = multi_hot(torch.tensor([[3, 3, -1, 7], [-1, -1, -1, 0]]))
    assert hot.tolist()[0] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0] and hot[1].nonzero().flatten().tolist() == [0]


def test_train_composites_change_each_epoch_but_replay_exactly():
    src = CompositeSource(numbered_split(100), size=50, seed=7)
    assert not torch.equal(src.order(0), src.order(1))
    assert torch.equal(src.order(1), CompositeSource(numbered_split(100), size=50, seed=7).order(1))


def tagged_split(n: int, tag: int) -> Split:
    """Items whose every pixel is `tag`, so a composite cell tells which split it came from."""
    return Split(torch.full((n, 28, 28), tag, dtype=torch.uint8), torch.arange(n) % 10)


def test_splits_never_share_items_and_val_test_are_fixed_by_data_seed():
    data = {"train": tagged_split(300, 1), "val": tagged_split(100, 2), "test": tagged_split(100, 3)}
    cfg = Config(task="multilabel", data=Data(val_size=100, test_size=80), model={"name": "cnn_rnn"})
    s = sources(cfg, data)
    for src, tag in ((s.train, 1), (s.train_eval, 1), (s.val, 2), (s.test, 3)):
        images = src.batch(src.order(0 if src.fixed_layout is None else None))["image"]
        assert set(images.unique().tolist()) == {0, tag}
    other = sources(Config(task="multilabel_bce", seed=5, data=Data(val_size=100, test_size=80),
                           model={"name": "cnn_bce"}), data)
    for a, b in ((s.val, other.val), (s.test, other.test)):
        assert torch.equal(a.order(None), b.order(None))
    assert not torch.equal(s.train.order(0), other.train.order(0))  # training draws depend on the run seed


def test_real_test_composites_use_only_test_items(fake_spec, fake_root):
    data = fm.splits(fake_root, val_size=100)
    src = CompositeSource(data["test"], size=200, seed=2, fixed=True)
    crops = cell_crops(src.batch(src.order(None))["image"], 2)
    occupied = crops[src.order(None) >= 0]
    test_items = {bytes(x.numpy()) for x in data["test"].images}
    assert all(bytes(x.numpy()) in test_items for x in occupied)


def test_augmentation_changes_items_only_and_replays_by_key():
    from cnnrnn.data.augment import Augment

    split = Split(torch.randint(1, 255, (50, 28, 28), dtype=torch.uint8), torch.arange(50) % 10)
    plain = CompositeSource(split, size=32, seed=1, fixed=True)
    augmented = CompositeSource(split, size=32, seed=1, fixed=True, augment=Augment(hflip=1.0, shift=0))
    layout = plain.order(None)
    a, b = plain.batch(layout), augmented.batch(layout, key=5)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["cells"], b["cells"])
    assert torch.equal(cell_crops(b["image"], 2)[layout < 0].unique(), torch.tensor([0], dtype=torch.uint8))
    assert torch.equal(cell_crops(b["image"], 2), cell_crops(a["image"], 2).flip(-1))  # every item mirrored
    shifted = CompositeSource(split, size=32, seed=1, fixed=True, augment=Augment(hflip=0.5, shift=2))
    assert torch.equal(shifted.batch(layout, key=7)["image"], shifted.batch(layout, key=7)["image"])
    assert not torch.equal(shifted.batch(layout, key=7)["image"], shifted.batch(layout, key=8)["image"])


def test_flip_mirrors_about_half_the_items_and_replays_by_seed():
    from cnnrnn.data.augment import Augment

    items = torch.randint(0, 255, (400, 28, 28), dtype=torch.uint8)
    out = Augment(hflip=0.5, shift=0)(items, seed=3)
    mirrored, kept = (out == items.flip(-1)).all(dim=(1, 2)), (out == items).all(dim=(1, 2))
    assert (mirrored | kept).all() and 150 < int(mirrored.sum()) < 250
    assert torch.equal(out, Augment(hflip=0.5, shift=0)(items, seed=3))
    assert not torch.equal(out, Augment(hflip=0.5, shift=0)(items, seed=4))
