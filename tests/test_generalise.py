"""What the main job uses to generalise: composite augmentation, transfer from a single-label cnn, the presets."""
from __future__ import annotations

import pytest
import torch

from cnnrnn import build
from cnnrnn.cli import compose_config
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource, cell_crops
from cnnrnn.data.fashion_mnist import Split
from cnnrnn.data.loader import batches
from cnnrnn.engine import save_checkpoint
from cnnrnn.errors import UserError
from cnnrnn.models import build_model

FULL = Augment(hflip=0.5, shift=2, erase=0.5, rotate=10, scale=0.1, contrast=0.2)


def split(n: int = 200) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 6:22, 8:20] = torch.randint(60, 255, (n, 16, 12), dtype=torch.uint8, generator=g)
    return Split(images, torch.arange(n) % 10)


def test_augmentation_keeps_every_label_and_cell_and_stays_inside_the_cells():
    plain = CompositeSource(split(), 64, seed=1)
    augmented = CompositeSource(split(), 64, seed=1, augment=FULL)
    layout = plain.order(0)
    a, b = plain.batch(layout, key=3), augmented.batch(layout, key=3)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["cells"], b["cells"])
    crops = cell_crops(b["image"], 2)
    assert crops[layout < 0].max() == 0                        # empty cells stay black: nothing crosses a border
    changed = (crops != cell_crops(a["image"], 2)).flatten(2).any(2)
    assert changed[layout >= 0].float().mean() > 0.9           # nearly every item is changed


def test_augmentation_replays_by_seed_and_step_so_a_resumed_run_sees_the_same_batches():
    src = CompositeSource(split(), 96, seed=5, augment=FULL)
    first = [b["image"] for b in batches(src, 32, epoch=2)]
    resumed = [b["image"] for b in batches(src, 32, epoch=2, start=1)]
    assert all(torch.equal(x, y) for x, y in zip(first[1:], resumed))
    assert not torch.equal(first[0], first[1])
    other_epoch = [b["image"] for b in batches(src, 32, epoch=3)]
    assert not torch.equal(first[0], other_epoch[0])


def test_augmentation_is_for_training_only():
    cfg = compose_config(["task=multilabel", "data.augment=true", "data.rotate=10"])
    data = {name: split(300) for name in ("train", "val", "test")}
    src = build.sources(cfg, data)
    assert isinstance(src.train.augment, Augment)
    assert src.val.augment is None and src.test.augment is None and src.train_eval.augment is None


def cnn_checkpoint(path, task: str = "cnn", **model) -> None:
    cfg = compose_config([f"task={task}", *[f"model.{k}={v}" for k, v in model.items()]])
    net = build.model(cfg)
    save_checkpoint(path, {"model": net.state_dict(), "config": cfg.to_dict()})


def test_init_from_copies_exactly_the_per_item_stage(tmp_path):
    path = tmp_path / "cnn.pt"
    cnn_checkpoint(path, convs=2, hidden=256)
    source = torch.load(path, weights_only=True)["model"]
    cfg = compose_config(["task=multilabel", f"model.init_from={path}"])
    net = build.model(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copied = build.init_encoder(net, path)
    after = net.state_dict()
    for key in source:
        if key.startswith("encoder."):
            assert key in copied and torch.equal(after[key], source[key]), key
    cell = "encoder.layers.15.weight"                          # the cell conv = the cnn's dense layer per cell
    assert cell in copied and torch.equal(after[cell], source["head.2.weight"].view(256, 64, 7, 7))
    untouched = [k for k in after if k not in copied]
    assert untouched and all(torch.equal(after[k], before[k]) for k in untouched)  # decoder as initialised
    assert not any(k.startswith(("embed", "cell.", "out")) for k in copied)


def test_init_from_refuses_a_misfit_or_a_multi_label_checkpoint(tmp_path):
    small = tmp_path / "small.pt"
    cnn_checkpoint(small)                                      # the default cnn: one conv per stage
    with pytest.raises(UserError, match=r"does not fit this encoder.*model.convs"):
        build.init_encoder(build.model(compose_config(["task=multilabel"])), small)
    multi = tmp_path / "multi.pt"
    cnn_checkpoint(multi, task="multilabel")
    with pytest.raises(UserError, match="holds a task=multilabel model, but the encoder starts only from a "
                                        "single-label cnn"):
        build.init_encoder(build.model(compose_config(["task=multilabel_bce"])), multi)
    with pytest.raises(UserError, match="does not exist"):
        build.preflight(compose_config(["task=multilabel", f"model.init_from={tmp_path / 'none.pt'}"]))


def test_bce_baseline_takes_the_same_encoder_options(tmp_path):
    path = tmp_path / "cnn.pt"
    cnn_checkpoint(path, convs=2, hidden=256)
    net = build.model(compose_config(["task=multilabel_bce", f"model.init_from={path}"]))
    assert len(build.init_encoder(net, path)) > 10


def test_large_preset_composes_and_is_wider():
    large, default = compose_config(["task=multilabel_large"]), compose_config(["task=multilabel"])
    assert large.kind == "sequence" and large.model["name"] == "cnn_rnn"
    assert sum(p.numel() for p in build.model(large).parameters()) > 2 * sum(
        p.numel() for p in build.model(default).parameters())
    assert large.trainer.epochs > default.trainer.epochs


def test_test_time_flips_average_a_mirrored_encoding():
    torch.manual_seed(0)
    net = build_model("cnn_rnn", channels=(4, 8), convs=1, cell=7, cell_dim=16, embed=8, hidden=16, attn_dim=8).eval()
    x = torch.randn(3, 1, 56, 56)
    feats, _, _, _ = net.encode(x)
    mirrored, _, _, _ = net.encode(x.flip(-1))
    both, _, _, _ = net.encode(x, flip=True)
    # (B, L=4, D): mirroring the canvas swaps the left and right cells of each row
    assert torch.allclose(both, (feats + mirrored[:, [1, 0, 3, 2]]) / 2, atol=1e-5)
