"""Batches by index gathers: per-epoch orders that replay, resumed epochs, each rank's share of a global batch."""
from __future__ import annotations

import torch

from cnnrnn.data.augment import Augment
from cnnrnn.data.items import Split
from cnnrnn.data.loader import ItemSource, batches, epoch_seed, num_batches


def items(n: int = 256) -> Split:
    return Split(torch.arange(n)[:, None, None].expand(n, 28, 28).to(torch.uint8).clone(), torch.arange(n) % 10)


def test_training_orders_are_fresh_permutations_per_epoch_and_evaluation_is_in_order():
    src = ItemSource(items(), seed=1, fixed=False)
    assert torch.equal(src.order(None), torch.arange(256))
    assert sorted(src.order(0).tolist()) == list(range(256))
    assert not torch.equal(src.order(0), src.order(1)) and torch.equal(src.order(1), src.order(1))
    assert epoch_seed(1, 0) != epoch_seed(1, 1) != epoch_seed(2, 1)


def test_an_epoch_resumed_mid_way_gives_the_rest_of_its_batches():
    src = ItemSource(items(), seed=1, augment=Augment(hflip=0.5, shift=2), fixed=False)
    whole = list(batches(src, 32, epoch=3, drop_last=True))
    rest = list(batches(src, 32, epoch=3, start=5, drop_last=True))
    assert len(rest) == len(whole) - 5
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(whole[5:], rest))


def test_batch_counts_with_and_without_the_last_partial_batch():
    assert num_batches(250, 32, drop_last=True) == 7 and num_batches(250, 32, drop_last=False) == 8
    assert [len(b["label"]) for b in batches(ItemSource(items(250)), 100)] == [100, 100, 50]


def test_each_ranks_items_get_their_own_augmentation():
    # every item the same asymmetric image: what differs between the ranks' i-th items is only the draw
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[5:20, 3:9] = 200
    split = Split(image.expand(256, 28, 28).clone(), torch.zeros(256, dtype=torch.long))
    src = ItemSource(split, seed=1, augment=Augment(hflip=0.5, shift=2), fixed=False)
    one = list(batches(src, 64, epoch=0, drop_last=True))
    ranks = [list(batches(src, 64, epoch=0, drop_last=True, rank=r, world=2)) for r in (0, 1)]
    for step in range(len(one)):
        a, b = ranks[0][step]["image"], ranks[1][step]["image"]
        assert not torch.equal(a, b), f"step {step}: both ranks' items drew the same flips and shifts"
        assert len(a) + len(b) == len(one[step]["image"])  # the global batch, split
    # one process keeps its keys: a run's augmentation does not change with this fix
    key = (1 * 1_000_003) % 2**31
    assert torch.equal(one[1]["image"], src.batch(torch.randperm(256, generator=torch.Generator().manual_seed(key))
                                                  [64:128], key=(key * 10_007 + 1) % 2**31)["image"])


def test_the_ranks_together_take_every_item_of_each_global_batch_once():
    src = ItemSource(items(), seed=2, fixed=False)
    one = [b["image"][:, 0, 0] for b in batches(src, 64, epoch=1, drop_last=True)]
    shares = [[b["image"][:, 0, 0] for b in batches(src, 64, epoch=1, drop_last=True, rank=r, world=2)]
              for r in (0, 1)]
    for step, whole in enumerate(one):
        assert sorted(torch.cat([shares[0][step], shares[1][step]]).tolist()) == sorted(whole.tolist())
