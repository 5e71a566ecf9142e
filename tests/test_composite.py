"""Composite images: canvas, empty cells, labels and counts, splits, repeats, mixed grids, cached cell features."""
from __future__ import annotations

import torch
from conftest import make_composites, sequence_task

from cnnrnn.data import fashion_mnist as fm
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import (
    CellFeatures,
    MixedGridSource,
    cell_crops,
    counts_of,
    multi_hot,
    render,
    sample_layout,
    with_background,
)
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.data.items import Split
from cnnrnn.data.loader import batches
from cnnrnn.models.cnn import SmallCNN, read_cells
from cnnrnn.ranks import Process
from cnnrnn.training import cell_features

CPU = Process(torch.device("cpu"), 0, 1, False, 0)


def numbered_split(n: int, offset: int = 0) -> Split:
    """Items whose pixels all equal (index + offset) % 250 + 1: every item is identifiable and never black."""
    values = (torch.arange(n) + offset) % 250 + 1
    return Split(values[:, None, None].expand(n, 28, 28).to(torch.uint8).clone(), torch.arange(n) % 10)


def random_split(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(1, 255, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def test_layout_respects_counts_and_distinct_cells():
    layout = sample_layout(2000, 50, 3, 2, 5, torch.Generator().manual_seed(0))
    k = (layout >= 0).sum(1)
    assert layout.shape == (2000, 9) and k.min() == 2 and k.max() == 5
    assert set(k.tolist()) == {2, 3, 4, 5}  # every count occurs
    assert layout.max() < 50


def test_canvas_cells_hold_the_placed_items_and_empty_cells_are_black():
    split = numbered_split(40)
    src = make_composites(split, size=64, grid=2, min_items=1, max_items=4, seed=3, fixed=True)
    batch = src.batch(src.order(None))
    assert batch["image"].shape == (64, 1, 56, 56) and batch["image"].dtype == torch.uint8
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
    canvas = render(with_background(split.images, (0,)), layout, 3)
    assert canvas.shape == (1, 1, 84, 84)
    assert canvas[0, 0, 0, 28] == split.images[1, 0, 0, 0] and canvas[0, 0, 28, 0] == split.images[3, 0, 0, 0]
    assert torch.equal(cell_crops(canvas, 3)[0], split.images[:9])


def test_multi_hot_holds_each_class_once_and_counts_of_counts_the_cells():
    cells = torch.tensor([[3, 3, -1, 7], [-1, -1, -1, 0]])
    hot = multi_hot(cells, 10)
    assert hot.tolist()[0] == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0] and hot[1].nonzero().flatten().tolist() == [0]
    assert counts_of(cells, 10).tolist()[0] == [0, 0, 0, 2, 0, 0, 0, 1, 0, 0]


def test_train_composites_change_each_epoch_but_replay_exactly():
    src = make_composites(numbered_split(100), size=50, seed=7)
    assert not torch.equal(src.order(0), src.order(1))
    assert torch.equal(src.order(1), make_composites(numbered_split(100), size=50, seed=7).order(1))


def test_real_test_composites_use_only_test_items(fake_root):
    data = fm.splits(fake_root, val_size=100)
    src = make_composites(data["test"], size=200, seed=2, fixed=True)
    crops = cell_crops(src.batch(src.order(None))["image"], 2)
    occupied = crops[src.order(None) >= 0]
    test_items = {bytes(x.numpy()) for x in data["test"].images}
    assert all(bytes(x.numpy()) in test_items for x in occupied)


def test_augmentation_changes_items_only_and_replays_by_key():
    split = random_split(50)
    plain = make_composites(split, size=32, seed=1, fixed=True)
    augmented = make_composites(split, size=32, seed=1, fixed=True, augment=Augment(hflip=1.0, shift=0))
    layout = plain.order(None)
    a, b = plain.batch(layout), augmented.batch(layout, key=5)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["cells"], b["cells"])
    assert torch.equal(cell_crops(b["image"], 2)[layout < 0].unique(), torch.tensor([0], dtype=torch.uint8))
    assert torch.equal(cell_crops(b["image"], 2), cell_crops(a["image"], 2).flip(-1))  # every item mirrored
    shifted = make_composites(split, size=32, seed=1, fixed=True, augment=Augment(hflip=0.5, shift=2))
    assert torch.equal(shifted.batch(layout, key=7)["image"], shifted.batch(layout, key=7)["image"])
    assert not torch.equal(shifted.batch(layout, key=7)["image"], shifted.batch(layout, key=8)["image"])


def test_repeat_composites_count_the_cells_that_hold_each_class(fake_root):
    split = fm.splits(fake_root, val_size=100)["train"]
    src = make_composites(split, size=400, grid=3, max_items=9, seed=1, fixed=True, repeats=0.6)
    batch = src.batch(src.order(None))
    cells, counts = batch["cells"], batch["counts"]
    for c in range(10):
        assert torch.equal(counts[:, c], (cells == c).sum(1).float())
    assert torch.equal(batch["labels"], (counts > 0).float())
    # with repeats a composite repeats classes far more often than independent items do
    plain = make_composites(split, size=400, grid=3, max_items=9, seed=1, fixed=True)
    repeated = lambda k: (k - 1).clamp(min=0).sum(1).mean()  # noqa: E731  items beyond each class's first
    assert repeated(counts) > 1.5 * repeated(plain.batch(plain.order(None))["counts"])
    # no repeats: the layouts are exactly sample_layout's draws (the default composites do not change)
    src0 = make_composites(split, size=50, grid=2, seed=5, fixed=True)
    assert torch.equal(src0.order(None), sample_layout(50, len(split), 2, 1, 4, torch.Generator().manual_seed(5)))


def test_mixed_grid_batches_are_each_one_size_and_replay_exactly(fake_root):
    split = fm.splits(fake_root, val_size=100)["train"]
    subs = [make_composites(split, size=300, grid=g, max_items=g * g, seed=2) for g in (2, 3)]
    src = MixedGridSource(subs, batch_size=20, seed=2)
    epoch = [b["image"] for b in batches(src, 20, epoch=1, drop_last=True)]
    sizes = [img.shape[1:] for img in epoch]
    assert set(sizes) == {(1, 56, 56), (1, 84, 84)} and all(len(img) == 20 for img in epoch)
    again = [b["image"] for b in batches(src, 20, epoch=1, start=7, drop_last=True)]   # a resumed epoch
    assert all(torch.equal(a, b) for a, b in zip(epoch[7:], again)) and len(again) == len(epoch) - 7
    ranks = [[b["image"] for b in batches(src, 20, epoch=1, drop_last=True, rank=r, world=2)] for r in (0, 1)]
    assert all(a.shape == b.shape for a, b in zip(*ranks))              # every rank's share is the same size
    other = [b["image"].shape for b in batches(src, 20, epoch=2, drop_last=True)]
    assert other != sizes                                                # sizes are redrawn each epoch


def reader_and_features(split: Split):
    torch.manual_seed(0)
    reader = SmallCNN(channels=(4, 8), hidden=16).eval()
    return reader, cell_features(reader, split.images, sequence_task(), CPU)


def test_cell_features_are_the_readers_features_of_the_cells_of_each_composite():
    split = random_split(60)
    reader, (feats, mirrored, blank) = reader_and_features(split)
    assert feats.shape == mirrored.shape == (60, 16) and blank.shape == (16,)
    src = make_composites(split, 10, seed=3, fixed=True)
    rows = src.order(None)
    pixels = src.batch(rows)
    cached = CellFeatures(src, feats, mirrored, blank, fixed=True).batch(rows)
    for key in ("cells", "labels", "counts"):
        assert torch.equal(cached[key], pixels[key])
    assert "image" not in cached and cached["feats"].shape == (10, 4, 16)
    with torch.no_grad():
        assert torch.allclose(cached["feats"], read_cells(reader, FORMAT.to_input(pixels["image"])), atol=1e-5)
        crops = cell_crops(pixels["image"], 2)
        in_place = torch.stack([reader.embed(FORMAT.to_input(crops[:, i].flip(-1))) for i in range(4)], 1)
    assert torch.allclose(cached["feats_flip"], in_place, atol=1e-5)  # each cell mirrored where it is


def test_training_cell_features_flip_items_as_often_as_asked_and_replay_by_key():
    split = random_split(60)
    _, (feats, mirrored, blank) = reader_and_features(split)
    src = make_composites(split, 40, seed=3)
    rows = src.order(0)
    occupied = rows >= 0
    never = CellFeatures(src, feats, mirrored, blank, hflip=0.0).batch(rows, key=1)["feats"][occupied]
    always = CellFeatures(src, feats, mirrored, blank, hflip=1.0).batch(rows, key=1)["feats"][occupied]
    assert torch.equal(never, feats[rows[occupied]]) and torch.equal(always, mirrored[rows[occupied]])
    half = CellFeatures(src, feats, mirrored, blank, hflip=0.5)
    first = half.batch(rows, key=1)["feats"][occupied]
    flipped = (first == mirrored[rows[occupied]]).all(1)
    assert 0.2 < flipped.float().mean() < 0.8
    assert torch.equal(half.batch(rows, key=1)["feats"], half.batch(rows, key=1)["feats"])
    assert not torch.equal(half.batch(rows, key=2)["feats"], half.batch(rows, key=1)["feats"])


def test_cell_features_follow_the_grid_of_each_mixed_batch():
    split = random_split(60)
    _, (feats, mirrored, blank) = reader_and_features(split)
    subs = [make_composites(split, size=80, grid=g, max_items=g * g, seed=2) for g in (2, 3)]
    cached = CellFeatures(MixedGridSource(subs, batch_size=20, seed=2), feats, mirrored, blank)
    shapes = {b["feats"].shape for b in batches(cached, 20, epoch=0, drop_last=True)}
    assert shapes == {(20, 4, 16), (20, 9, 16)}
