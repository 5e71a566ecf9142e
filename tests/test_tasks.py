"""Each kind of task: target sequences, predictions, labels, metrics, the tile oracle, state, outputs."""
from __future__ import annotations

import pytest
import torch
from conftest import bce_task, fake_items, make_composites, sequence_task, single_task
from torch import nn

from cnnrnn import build, metrics
from cnnrnn.config import preset
from cnnrnn.data.composite import cell_crops
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.data.items import Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.models import build_model
from cnnrnn.models.cnn import read_cells
from cnnrnn.tasks import (
    Classification,
    LabelSequence,
    MultiLabelBCE,
    TileOracle,
    make_task,
)

END = 10
LABELS = torch.tensor([[0, 1, 0, 1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                       [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
CELLS = torch.tensor([[7, 3, -1, 1], [-1, 9, 9, -1], [2, 0, 3, 1]])
SMALL = {"channels": [4, 8], "convs": 1, "cell_dim": 16}


def decoder(**kw):
    torch.manual_seed(0)
    return build_model("cnn_rnn", **SMALL, embed=8, hidden=16, attn_dim=8, dropout=0.0, **kw).eval()


def fake_split(n: int = 200) -> Split:
    images, labels = fake_items(n, 0)
    return Split(torch.from_numpy(images), torch.from_numpy(labels).long())


@pytest.mark.parametrize("order", ["frequency", "rare_first", "spatial", "random"])
def test_every_fixed_order_is_a_permutation_of_the_labels(order):
    counts = [50, 60, 10, 40, 5, 5, 5, 30, 5, 20]
    seq = sequence_task(order=order, class_counts=counts).sequences(LABELS, CELLS)
    assert seq.shape == (3, 5)
    for row, hot in zip(seq.tolist(), LABELS):
        n = int(hot.sum())
        assert sorted(row[:n]) == hot.nonzero().flatten().tolist() and row[n] == END
        assert all(t == -100 for t in row[n + 1:])
    expected = {"frequency": [1, 3, 7], "rare_first": [7, 3, 1], "spatial": [7, 3, 1]}
    if order in expected:
        assert seq[0, :3].tolist() == expected[order]
    if order == "spatial":
        assert seq[2, :4].tolist() == [2, 0, 3, 1]


def test_orderless_targets_follow_the_models_ranking_and_cover_the_labels():
    class Ranker(nn.Module):
        """Stands in for the decoder: logits that rank classes 9, 8, ..., 0, and records the targets."""
        def forward(self, x, teacher, steps=None):
            logits = torch.arange(11, dtype=torch.float).expand(len(x), 11).clone()
            self.targets = torch.stack([teacher(t, logits) for t in range(steps)], dim=1)
            return logits[:, None].expand(-1, steps, -1)

    model = Ranker()
    task = sequence_task(order="orderless")
    task.loss(model, {"image": torch.zeros(3, 56, 56, dtype=torch.uint8), "labels": LABELS, "cells": CELLS})
    assert model.targets.tolist() == [[7, 3, 1, END, -100], [9, END, -100, -100, -100], [3, 2, 1, 0, END]]


def test_multiset_targets_name_every_item():
    cells = torch.tensor([[7, 3, 7, -1], [-1, 9, 9, 9]])
    task = sequence_task(order="frequency", class_counts=[1] * 10, target="multiset")
    assert task.sequences(None, cells).tolist() == [[3, 7, 7, END, -100], [9, 9, 9, END, -100]]
    spatial = sequence_task(order="spatial", target="multiset").sequences(None, cells)
    assert spatial.tolist() == [[7, 3, 7, END, -100], [9, 9, 9, END, -100]]


def test_make_task_picks_the_kind_and_restores_the_saved_state():
    assert isinstance(make_task(preset("cnn"), FORMAT), Classification)
    bce = make_task(preset("multilabel_bce"), FORMAT, state={"threshold": 0.37})
    assert isinstance(bce, MultiLabelBCE) and bce.state() == {"threshold": 0.37}
    counts = [5, 1, 9, 0, 0, 0, 0, 0, 0, 2]
    seq = make_task(preset("multilabel", model={"label_order": "rare_first"}), FORMAT, state={"class_counts": counts})
    assert isinstance(seq, LabelSequence) and seq.state() == {"order": "rare_first", "class_counts": counts,
                                                              "steps": None}
    fresh = make_task(preset("multilabel"), FORMAT, train_labels=torch.tensor([2, 2, 2, 0, 9]))
    assert fresh.state()["class_counts"] == [1, 0, 3, 0, 0, 0, 0, 0, 0, 1]
    assert fresh.sequences(torch.tensor([[1.0, 0, 1, 0, 0, 0, 0, 0, 0, 1]]), torch.tensor([[0, 2, 9, -1]]))[
        0, :3].tolist() == [2, 0, 9]                                  # most frequent training class first
    assert make_task(preset("multilabel", model={"target": "multiset"}), FORMAT).multiset


def test_classification_predicts_softmax_scores_labels_and_accuracy():
    torch.manual_seed(0)
    model = build_model("cnn", channels=(4, 8), hidden=16).eval()
    images = torch.from_numpy(fake_items(8, 0)[0])
    out = single_task().predict(model, {"image": images})
    assert set(out) == {"logits", "scores"} and torch.allclose(out["scores"].sum(1), torch.ones(8))
    assert single_task().labels(out) == [[int(i)] for i in out["scores"].argmax(1)]
    flipped = single_task(tta=True).predict(model, {"image": images})["scores"]
    mirror = model(FORMAT.to_input(images).flip(-1)).softmax(1)
    assert torch.allclose(flipped, (out["scores"] + mirror) / 2, atol=1e-6)
    target = out["scores"].argmax(1)
    assert single_task().metrics(out, target)["acc"] == 1.0


def test_bce_labels_are_the_scores_over_the_tuned_threshold():
    task = bce_task(threshold=0.5)
    scores = torch.tensor([[0.9, 0.45, 0.1] + [0.0] * 7, [0.3, 0.6, 0.44] + [0.0] * 7])
    assert task.labels({"scores": scores}) == [[0], [1]]
    target = torch.zeros(2, 10)
    target[0, [0, 1]] = 1
    target[1, [1, 2]] = 1
    assert task.tune({"scores": scores}, target) == {"threshold": task.threshold}
    assert task.threshold == metrics.best_threshold(target.numpy(), scores.numpy()) and task.threshold < 0.45
    assert task.labels({"scores": scores}) == [[0, 1], [1, 2]]
    result = task.metrics({"scores": scores}, target)
    assert result["f1_samples"] == 1.0 and result["f1_samples_at_0.5"] < 1.0  # the untuned threshold too


def test_decoder_labels_come_in_emission_order_and_counts_per_class():
    task = sequence_task()
    out = {"tokens": torch.tensor([[7, 3, END, END], [9, 9, 1, END]])}
    assert task.labels(out) == [[7, 3], [9, 9, 1]]
    assert task.counts(out)[1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 0, 2]


def test_decoding_stops_after_one_label_per_cell_of_the_picture_or_max_items():
    task = sequence_task()
    assert task.limit(torch.zeros(2, 1, 84, 56)) == 6 and task.limit(torch.zeros(2, 9, 16)) == 9
    task.max_items = 5
    assert task.limit(torch.zeros(2, 1, 84, 84)) == 5 and task.limit(torch.zeros(2, 1, 56, 56)) == 4
    net = decoder(max_labels=4)                                     # a model trained on 2x2 composites
    with torch.no_grad():
        net.out.bias[END] = -50.0                                    # END never likely
    images = torch.randint(1, 255, (6, 84, 84), dtype=torch.uint8)
    out = sequence_task().predict(net, {"image": images})
    assert out["tokens"].shape == (6, 10) and out["alpha"].shape == (6, 10, 9)
    assert all(len(row) == 9 for row in sequence_task().labels(out))  # one label per cell of the 3x3 picture
    assert all(len(row) == 5 for row in task.labels(task.predict(net, {"image": images})))


def test_multi_label_metrics_of_the_decoder_include_grounding_and_counts_for_a_multiset():
    net = decoder()
    src = make_composites(fake_split(), 20, seed=1, fixed=True, repeats=0.5)
    batch = src.batch(src.order(None))
    for target in ("set", "multiset"):
        task = sequence_task(target=target)
        out = task.predict(net, batch)
        assert torch.equal(out["cells"], batch["cells"])             # passed on beside, for grounding
        result = task.metrics(out, task.target(batch))
        assert {"f1_samples", "exact_match", "map"} <= set(result)
        assert ("multiset_exact" in result) == (target == "multiset")


def test_the_tile_oracle_names_the_class_of_each_occupied_cell():
    class Brightness(nn.Module):
        """A stand-in reader: class = the pixel value of the item (the items below are flat)."""
        def forward(self, x):
            level = (x[:, 0, 0, 0] * 0.3530 + 0.2860) * 255            # back from to_input's scaling
            return nn.functional.one_hot(level.round().long() % 10, 10).float() * 10

    images = torch.arange(40, dtype=torch.uint8)[:, None, None].expand(40, 28, 28).clone()
    src = make_composites(Split(images, torch.arange(40) % 10), 30, seed=3, fixed=True)
    batch = src.batch(src.order(None))
    out = TileOracle(FORMAT).predict(Brightness(), batch)
    assert torch.equal(out["pred"], batch["labels"].bool())          # empty cells name nothing
    result = TileOracle(FORMAT).metrics(out, batch["labels"])
    assert result["exact_match"] == 1.0 and result["f1_samples"] == 1.0


def cell_features(reader, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What CellFeatures gives for pictures: each cell's features, and those of each cell mirrored in place."""
    x = FORMAT.to_input(images)
    crops = cell_crops(images, images.shape[-1] // 28)
    mirrored = torch.stack([reader.embed(FORMAT.to_input(crops[:, i].flip(-1))) for i in range(crops.shape[1])], 1)
    return {"feats": read_cells(reader, x), "feats_flip": mirrored}


@pytest.mark.parametrize("tta", [False, True])
def test_predictions_from_cell_features_equal_those_from_the_pictures(tta):
    src = make_composites(fake_split(), 12, seed=2, fixed=True)
    images = src.batch(src.order(None))["image"]
    net = decoder()
    feats = cell_features(net.reader, images)
    seq = sequence_task(tta=tta)
    assert torch.equal(seq.predict(net, {"image": images})["tokens"], seq.predict(net, feats)["tokens"])
    torch.manual_seed(0)
    bce_net = build_model("cnn_bce", **SMALL).eval()
    bce = bce_task(tta=tta)
    assert torch.allclose(bce.predict(bce_net, {"image": images})["scores"],
                          bce.predict(bce_net, cell_features(bce_net.reader, images))["scores"], atol=1e-5)


@pytest.mark.parametrize("task_name", ["cnn", "lstm", "multilabel", "multilabel_bce"])
def test_every_task_trains_on_its_blank_batch_and_exports_what_it_predicts(task_name):
    cfg = preset(task_name, model={"channels": [4, 8]} if task_name != "lstm" else {"hidden": 8})
    task = make_task(cfg, FORMAT)
    model = build.model(cfg, FORMAT)
    loss, _ = task.loss(model.train(), task.blank_batch(cfg))
    assert loss.ndim == 0 and torch.isfinite(loss)
    out = task.predict(model.eval(), {"image": task.blank_batch(cfg)["image"]})
    assert set(task.outputs) <= set(out)
    assert task.side(cfg) == (28 if task.kind == "single" else 56) and task.composite == (task.kind != "single")


def test_figures_of_each_kind():
    split = fake_split()
    items = make_composites(split, 12, seed=1, fixed=True)
    net = decoder()
    seq = sequence_task()
    batch = items.batch(items.order(None))
    out = seq.predict(net, batch)
    figs = seq.figures(out, seq.target(batch), items, seq.metrics(out, seq.target(batch)))
    assert set(figs) == {"test/composites", "test/f1_per_class", "test/attention"}
    single = ItemSource(split)
    model = build_model("cnn", channels=(4, 8), hidden=16).eval()
    task = single_task()
    batch = single.batch(torch.arange(len(split)))
    figs = task.figures(task.predict(model, batch), batch["label"], single, {})
    assert set(figs) == {"test/confusion_matrix", "test/misclassified"}
    import matplotlib.pyplot as plt
    plt.close("all")
