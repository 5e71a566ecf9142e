"""A run's four sources: items or composites, apart, augmented for training only, the same on any device."""
from __future__ import annotations

import hashlib

import pytest
import torch

from cnnrnn.config import Config, preset
from cnnrnn.data import sources
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.data.items import Split
from cnnrnn.data.loader import ItemSource, batches
from cnnrnn.tasks import make_task

# One config per data path: single items (plain; flip+shift+degrade), composites (flips and shifts; degraded with
# repeats and the outfit scene; mixed grids).
CASES = {
    "items": ("cnn", {}),
    "items_augment_degrade": ("cnn", dict(augment=True, shift=2, degrade=0.3)),
    "composites_augment": ("multilabel", dict(augment=True, shift=2)),
    "composites_degrade_repeats_scene": ("multilabel", dict(degrade=0.3, repeats=0.3, scene="outfit")),
    "composites_mixed_grids": ("multilabel_bce", dict(grid=[2, 3], augment=True, shift=1)),
}


def tiny_data() -> dict[str, Split]:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)

    return {"train": split(240), "val": split(60), "test": split(60)}


def config(case: str, seed: int = 0) -> Config:
    task, data = CASES[case]
    return preset(task, seed=seed, data=dict(val_size=60, test_size=50, train_eval_size=40, **data))


def make(cfg: Config, data: dict[str, Split], device=None) -> sources.Sources:
    return make_task(cfg, FORMAT).sources(cfg, data, device=device)


def all_batches(src) -> list[dict[str, torch.Tensor]]:
    """Two training epochs (one process, and rank 1 of 2), and the fixed sources once."""
    out = []
    for epoch in (0, 1):
        out += list(batches(src.train, 32, epoch=epoch, drop_last=True))
    out += list(batches(src.train, 32, epoch=2, drop_last=True, rank=1, world=2))
    for fixed in (src.train_eval, src.val, src.test):
        out += list(batches(fixed, 32))
    return out


def digest(batch_list: list[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in batch_list:
        for key in sorted(batch):
            t = batch[key].cpu().contiguous()
            h.update(f"{key}{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with the CPU path")
@pytest.mark.parametrize("case", sorted(CASES))
def test_batches_made_on_a_gpu_equal_the_cpu_data_path(case):
    on_gpu = all_batches(make(config(case), tiny_data(), device="cuda"))
    assert digest(on_gpu) == digest(all_batches(make(config(case), tiny_data())))
    assert all(t.device.type == "cuda" for b in on_gpu for t in b.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_seed_replays_its_batches_and_another_seed_draws_others(case):
    first = all_batches(make(config(case), tiny_data()))
    assert digest(all_batches(make(config(case), tiny_data()))) == digest(first)
    train = all_batches(make(config(case, seed=1), tiny_data()))[:7]  # epoch 0: only training draws depend on seed
    assert digest(train) != digest(first[:7])


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_epoch_resumed_mid_way_gives_the_rest_of_its_batches(case):
    src = make(config(case), tiny_data())
    whole = list(batches(src.train, 32, epoch=1, drop_last=True))
    assert digest(list(batches(src.train, 32, epoch=1, start=3, drop_last=True))) == digest(whole[3:])


def test_split_to_moves_items_and_labels():
    split = tiny_data()["train"]
    moved = split.to(torch.device("cpu"))
    assert moved.images.device.type == moved.labels.device.type == "cpu"
    assert torch.equal(moved.images, split.images) and torch.equal(moved.labels, split.labels)
    assert torch.equal(moved.subset(torch.tensor([3, 1])).labels, split.labels[[3, 1]])


def tagged_split(n: int, tag: int) -> Split:
    """Items whose every pixel is `tag`, so a composite cell tells which split it came from."""
    return Split(torch.full((n, 28, 28), tag, dtype=torch.uint8), torch.arange(n) % 10)


def test_splits_never_share_items_and_val_test_are_fixed_by_data_seed():
    data = {"train": tagged_split(300, 1), "val": tagged_split(100, 2), "test": tagged_split(100, 3)}
    cfg = preset("multilabel", data={"val_size": 100, "test_size": 80})
    s = make(cfg, data)
    for src, tag in ((s.train, 1), (s.train_eval, 1), (s.val, 2), (s.test, 3)):
        images = src.batch(src.order(0 if src.fixed_layout is None else None))["image"]
        assert set(images.unique().tolist()) == {0, tag}
    other = make(preset("multilabel_bce", seed=5, data={"val_size": 100, "test_size": 80}), data)
    for a, b in ((s.val, other.val), (s.test, other.test)):
        assert torch.equal(a.order(None), b.order(None))
    assert not torch.equal(s.train.order(0), other.train.order(0))  # training draws depend on the run seed
    assert len(s.test) == 80 and len(s.val) == 100 and len(s.train) == 300


def test_single_item_sources_hold_the_split_and_a_fixed_share_of_training_items():
    data = {"train": tagged_split(300, 1), "val": tagged_split(100, 2), "test": tagged_split(100, 3)}
    s = make(preset("cnn", data={"val_size": 100, "train_eval_size": 40}), data)
    assert all(isinstance(x, ItemSource) for x in (s.train, s.train_eval, s.val, s.test))
    assert (len(s.train), len(s.train_eval), len(s.val), len(s.test)) == (300, 40, 100, 100)
    assert not s.train.fixed and s.val.fixed and s.test.fixed


def test_augmentation_is_for_training_only():
    cfg = preset("multilabel", data={"augment": True, "shift": 1})
    data = {name: tagged_split(300, 1) for name in ("train", "val", "test")}
    src = make(cfg, data)
    assert isinstance(src.train.augment, Augment)
    assert src.val.augment is None and src.test.augment is None and src.train_eval.augment is None
    assert sources.augmentation(preset("multilabel", data={"augment": False}).data, FORMAT) is None


def test_composites_of_a_mixed_grid_are_validated_and_tested_on_the_largest():
    data = {name: tagged_split(300, 1) for name in ("train", "val", "test")}
    s = make(preset("multilabel", data={"grid": [2, 3], "max_items": 9, "val_size": 100, "test_size": 50}), data)
    assert isinstance(s.test, CompositeSource) and s.test.grid == s.val.grid == s.train_eval.grid == 3
    assert sorted(sub.grid for sub in s.train.sources) == [2, 3] and s.train.sources[0].max_items == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_batches_equal_cpu_batches(case):
    cpu = all_batches(make(config(case), tiny_data()))
    cuda = all_batches(make(config(case), tiny_data(), device="cuda"))
    assert all(t.device.type == "cuda" for b in cuda for t in b.values())
    for a, b in zip(cpu, cuda, strict=True):
        for key in a:
            if "degrade" in case and key == "image":
                # blur through F.interpolate: CUDA's float sums may round a pixel the other way
                assert (a[key].int() - b[key].cpu().int()).abs().max() <= 1
                assert (a[key] != b[key].cpu()).float().mean() < 1e-3
            else:
                assert torch.equal(a[key], b[key].cpu()), key
