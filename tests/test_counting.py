"""Counting (multiset mode): composites that repeat classes, multiset targets, the count mask, the multiset
metrics, and a multiset run on mixed grids."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnrnn import build, metrics, predict
from cnnrnn.cli import compose_config
from cnnrnn.data.composite import CompositeSource, sample_layout
from cnnrnn.data.fashion_mnist import splits
from cnnrnn.engine import save_checkpoint
from cnnrnn.models import build_model
from cnnrnn.tasks import LabelSequence
from cnnrnn.train import run
from conftest import tiny

END = 10


def test_repeat_composites_count_the_cells_that_hold_each_class(fake_root):
    split = splits(fake_root, val_size=100)["train"]
    src = CompositeSource(split, size=400, grid=3, max_items=9, seed=1, fixed=True, repeats=0.6)
    batch = src.batch(src.order(None))
    cells, counts = batch["cells"], batch["counts"]
    for c in range(10):
        assert torch.equal(counts[:, c], (cells == c).sum(1).float())
    assert torch.equal(batch["labels"], (counts > 0).float())
    # with repeats a composite repeats classes far more often than independent items do
    plain = CompositeSource(split, size=400, grid=3, max_items=9, seed=1, fixed=True)
    repeated = lambda k: (k - 1).clamp(min=0).sum(1).mean()  # noqa: E731  items beyond each class's first
    assert repeated(counts) > 1.5 * repeated(plain.batch(plain.order(None))["counts"])
    # no repeats: the layouts are exactly sample_layout's draws (the default composites do not change)
    src0 = CompositeSource(split, size=50, grid=2, seed=5, fixed=True)
    assert torch.equal(src0.order(None), sample_layout(50, len(split), 2, 1, 4, torch.Generator().manual_seed(5)))


def test_multiset_targets_name_every_item():
    cells = torch.tensor([[7, 3, 7, -1], [-1, 9, 9, 9]])
    task = LabelSequence(order="frequency", class_counts=[1] * 10, target="multiset")
    seq = task.sequences(None, cells)
    assert seq.tolist() == [[3, 7, 7, END, -100], [9, 9, 9, END, -100]]
    spatial = LabelSequence(order="spatial", target="multiset").sequences(None, cells)
    assert spatial.tolist() == [[7, 3, 7, END, -100], [9, 9, 9, END, -100]]


def decoder(target: str):
    torch.manual_seed(0)
    model = build_model("cnn_rnn", channels=(4, 8), cell=7, cell_dim=8, embed=8, hidden=16, attn_dim=8, dropout=0.0,
                        target=target).eval()
    with torch.no_grad():  # one class strongly preferred, END never likely
        model.out.bias[3], model.out.bias[END] = 20.0, -50.0
    return model


@pytest.mark.parametrize("side,cells", [(56, 4), (84, 9)])
def test_count_mask_repeats_while_cells_remain_and_never_names_more_items_than_cells(side, cells):
    x = torch.randn(3, 1, side, side)
    for beam in (1, 3):
        out = decoder("multiset").generate(x, beam_size=beam, max_labels=cells)
        assert (out["counts"][:, 3] == cells).all() and (out["counts"].sum(1) == cells).all()
        assert (out["tokens"][:, cells] == END).all()
        out = decoder("set").generate(x, beam_size=beam, max_labels=cells)
        assert (out["counts"] <= 1).all()  # the set decoder never repeats a class
    allowed = decoder("multiset")._allowed
    assert allowed(torch.tensor([[3] + [0] * 9]), t=3, limit=4)[0].all()  # a repeat while a cell is unfilled
    assert allowed(torch.tensor([[4] + [0] * 9]), t=4, limit=4)[0].tolist() == [False] * 10 + [True]  # then END


def test_multiset_metrics_on_hand_made_counts():
    classes = ["a", "b", "c"]
    true = np.array([[2, 0, 1], [0, 1, 0], [1, 1, 1]])
    pred = np.array([[1, 0, 1], [0, 3, 0], [1, 1, 1]])  # one too few a; two too many b; right
    m = metrics.multiset(true, pred, classes)
    assert m["multiset_exact"] == pytest.approx(1 / 3)
    assert m["count_acc"] == pytest.approx(1 / 3)                  # totals 3/2, 1/3, 3/3
    # per class: matches a 2 of (3 true + 2 pred); b 2 of (2 + 4); c 2 of (2 + 2)
    assert m["multiset_f1/a"] == pytest.approx(4 / 5) and m["multiset_f1/b"] == pytest.approx(4 / 6)
    assert m["multiset_f1/c"] == pytest.approx(1.0)
    assert m["multiset_f1_micro"] == pytest.approx(12 / 15)
    assert m["multiset_f1_macro"] == pytest.approx((4 / 5 + 4 / 6 + 1) / 3)
    assert m["count_mae/a"] == pytest.approx(1 / 3) and m["count_mae/b"] == pytest.approx(2 / 3)
    assert m["count_mae/c"] == 0 and m["count_mae"] == pytest.approx(1 / 3)


def untrained_checkpoint(path, root, *overrides: str):
    cfg = compose_config([f"data.root={root}", "model.channels=[4,8]", *overrides])
    torch.manual_seed(0)
    model = build.model(cfg)
    if cfg.kind == "sequence":
        with torch.no_grad():  # Pullover strongly preferred, END never likely
            model.out.bias[2], model.out.bias[END] = 20.0, -50.0
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task_state": {}})


def test_predict_repeats_labels_and_adds_counts_in_multiset_mode(fake_root, tmp_path, capsys):
    ckpt, png = tmp_path / "m.pt", tmp_path / "p.png"
    untrained_checkpoint(ckpt, fake_root, "task=multilabel", "model.target=multiset")
    Image.fromarray(np.zeros((56, 84), np.uint8)).save(png)  # 2 x 3 cells
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(ckpt), str(png)])
        raise SystemExit(0)
    record = json.loads(capsys.readouterr().out)
    assert exit_info.value.code == 0 and record["labels"] == ["Pullover"] * 6 and record["counts"] == {"Pullover": 6}


def test_a_multiset_run_on_mixed_grids_reports_counting_metrics(fake_root, tmp_path):
    oracle = tmp_path / "cnn.pt"
    untrained_checkpoint(oracle, fake_root, "task=cnn")
    small = ["trainer.epochs=1", "model.channels=[4,8]", "model.cell_dim=16", "model.hidden=16", "model.embed=8",
             "model.attn_dim=8", "data.test_size=60", "data.epoch_size=100", "data.train_eval_size=0",
             f"oracle.ckpt={oracle}"]
    cfg = compose_config(["task=multilabel", *tiny(fake_root, *small, "data.grid=[2,3]", "data.max_items=9",
                                                   "data.repeats=0.5", "model.target=multiset")])
    assert cfg.data.grids == (2, 3) and cfg.data.test_grid == 3
    result = run(cfg, tmp_path / "run")
    for key in ("test/multiset_exact", "test/count_acc", "test/multiset_f1_micro", "test/count_mae",
                "test/f1_samples", "oracle/f1_samples"):
        assert 0 <= result[key] <= 9, key
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/count_acc"] == result["test/count_acc"]
