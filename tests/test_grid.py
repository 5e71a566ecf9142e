"""Any grid at inference (a model trained on 2x2 composites evaluates and predicts on larger or other
pictures) and mixed grids in training (batches of one size each that replay exactly)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnrnn import build, cli, predict
from cnnrnn.cli import compose_config
from cnnrnn.config import from_dict
from cnnrnn.data.composite import CompositeSource, MixedGridSource
from cnnrnn.data.fashion_mnist import CLASSES, splits
from cnnrnn.data.loader import batches
from cnnrnn.engine import load_checkpoint, save_checkpoint
from cnnrnn.errors import UserError
from cnnrnn.evaluate import evaluate_checkpoint
from cnnrnn.models import build_model
from cnnrnn.tasks import to_input

END = len(CLASSES)


def write_checkpoint(path, root, task: str = "multilabel", *extra: str, never_end: bool = False):
    """An untrained grid-2 checkpoint; `never_end` makes the decoder want to go on naming items forever."""
    cfg = compose_config([f"task={task}", f"data.root={root}", "model.channels=[4,8]", "data.test_size=60",
                          "data.val_size=100", *extra])
    torch.manual_seed(0)
    model = build.model(cfg)
    if never_end:
        with torch.no_grad():
            model.out.bias[END] = -50.0
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task_state": {}})
    return cfg


def grid_images(root, grid: int, n: int = 6) -> torch.Tensor:
    src = CompositeSource(splits(root, val_size=100)["test"], size=n, grid=grid, max_items=grid * grid, seed=3,
                          fixed=True)
    return src.batch(src.order(None))["image"]


def run_predict(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, [json.loads(line) for line in out.splitlines()], err


def test_grid2_model_decodes_one_label_per_cell_of_a_grid3_tensor(fake_root, tmp_path):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, fake_root, never_end=True)
    _, model, task = build.from_checkpoint(load_checkpoint(ckpt), ckpt)
    assert model.max_labels == 4
    images = grid_images(fake_root, 3)                                  # (6, 84, 84)
    out = task.predict(model, {"image": images})
    assert out["tokens"].shape == (6, 10) and out["alpha"].shape == (6, 10, 9)
    assert (out["pred"].sum(1) == 9).all()                              # END never likely: one label per cell
    task.max_items = 5
    assert (task.predict(model, {"image": images})["pred"].sum(1) == 5).all()


def test_on_a_larger_picture_the_decoder_reads_the_occupied_cells_and_only_enough_empty_ones():
    torch.manual_seed(0)
    net = build_model("cnn_rnn", channels=(4, 8), convs=1, cell=7, cell_dim=16, embed=8, hidden=16, attn_dim=8,
                      max_labels=4).eval()                            # trained on 2x2: 4 cells
    images = torch.zeros(3, 84, 84, dtype=torch.uint8)

    def fill(i, cell, high=256):
        r, c = divmod(cell, 3)
        images[i, 28 * r: 28 * r + 28, 28 * c: 28 * c + 28] = torch.randint(0, high, (28, 28), dtype=torch.uint8)

    for cell in (1, 5):
        fill(0, cell)
    for cell in range(6):
        fill(1, cell)
    fill(2, 4)
    fill(2, 0, high=3)                                  # a faint speck of noise: still an empty cell
    read = net.cells_read(to_input(images), 3, 3)
    cells = lambda *on: [i in on for i in range(9)]    # noqa: E731
    assert read[0].tolist() == cells(0, 1, 2, 5)        # the 2 items and the first 2 empty cells: 4 in all
    assert read[1].tolist() == cells(*range(6))         # more items than 4 cells: every item, no empty cell
    assert read[2].tolist() == cells(0, 1, 2, 4)
    assert net.cells_read(to_input(images[:, :56, :56]), 2, 2) is None           # the training size: all
    feats, _, (h, _), _ = net.encode(to_input(images))          # the initial state: from the cells read only
    assert torch.allclose(h[0], torch.tanh(net.init_h(feats[0, read[0]].mean(0))), atol=1e-6)
    out = net.generate(to_input(images), max_labels=9)
    alpha = out["alpha"][:, :1]                                                   # (3, 1, 9): the first step
    assert (alpha[~read[:, None]] == 0).all() and torch.allclose(alpha.sum(-1), torch.ones(3, 1))
    patches = build_model("cnn_rnn", channels=(4, 8), convs=1, cell=0, embed=8, hidden=16, attn_dim=8)
    assert patches.cells_read(to_input(images), 21, 21) is None   # positions are patches, not cells


def test_predict_reads_any_multiple_of_28_and_refuses_other_sizes(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, fake_root, never_end=True)
    images = grid_images(fake_root, 3, 2)
    big, wide, odd = tmp_path / "big.png", tmp_path / "wide.png", tmp_path / "odd.png"
    Image.fromarray(images[0].numpy()).save(big)
    Image.fromarray(images[1, :56].numpy()).save(wide)                 # 84 wide, 56 high: 2 x 3 cells
    Image.fromarray(np.zeros((70, 70), np.uint8)).save(odd)
    code, records, err = run_predict(capsys, ckpt, big, odd, wide)
    assert code == 2 and [r["image"] for r in records] == [str(big), str(wide)]
    assert [len(r["labels"]) for r in records] == [9, 6]
    lines = [line for line in err.splitlines() if line]
    assert len(lines) == 1 and "odd.png is 70x70 pixels" in lines[0] and "multiples of 28" in lines[0]
    assert lines[0].count(". ") == 0 and "--resize" in lines[0]       # one sentence, and the way out
    code, records, err = run_predict(capsys, ckpt, odd, "--resize", "--max-items", "3")
    assert code == 0 and len(records) == 1 and len(records[0]["labels"]) <= 3


def test_evaluate_builds_test_composites_of_another_grid(fake_root, tmp_path):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, fake_root)
    results = evaluate_checkpoint(ckpt, grid=3, max_items=4)
    assert results["test/grid"] == 3 and results["test/max_items"] == 4 and 0 <= results["test/f1_samples"] <= 1
    bce = tmp_path / "bce.pt"
    write_checkpoint(bce, fake_root, "multilabel_bce")                  # global max pool: any grid as well
    assert "test/f1_samples" in evaluate_checkpoint(bce, grid=3)
    cnn = tmp_path / "cnn.pt"
    write_checkpoint(cnn, fake_root, "cnn")
    with pytest.raises(UserError, match="single-label"):
        evaluate_checkpoint(cnn, grid=3)


def test_checkpoints_from_before_grid_and_counting_keys_load_and_predict(fake_root, tmp_path):
    ckpt = tmp_path / "old.pt"
    cfg = write_checkpoint(ckpt, fake_root)
    state = load_checkpoint(ckpt)
    old = cfg.to_dict()
    for key in ("eval_grid", "repeats"):  # keys added by these changes
        old["data"].pop(key, None)
    old["model"].pop("target", None)
    assert from_dict(old).data.test_grid == 2
    save_checkpoint(ckpt, {**state, "config": old})
    _, model, task = build.from_checkpoint(load_checkpoint(ckpt), ckpt)
    labels, _ = predict.predict(model, task, grid_images(fake_root, 2))
    assert all(len(set(row)) == len(row) <= 4 for row in labels)


def test_mixed_grid_batches_are_each_one_size_and_replay_exactly(fake_root):
    split = splits(fake_root, val_size=100)["train"]
    subs = [CompositeSource(split, size=300, grid=g, max_items=g * g, seed=2) for g in (2, 3)]
    src = MixedGridSource(subs, batch_size=20, seed=2)
    epoch = [b["image"] for b in batches(src, 20, epoch=1, drop_last=True)]
    sizes = [img.shape[1:] for img in epoch]
    assert set(sizes) == {(56, 56), (84, 84)} and all(len(img) == 20 for img in epoch)
    again = [b["image"] for b in batches(src, 20, epoch=1, start=7, drop_last=True)]   # a resumed epoch
    assert all(torch.equal(a, b) for a, b in zip(epoch[7:], again)) and len(again) == len(epoch) - 7
    ranks = [[b["image"] for b in batches(src, 20, epoch=1, drop_last=True, rank=r, world=2)] for r in (0, 1)]
    assert all(a.shape == b.shape for a, b in zip(*ranks))              # every rank's share is the same size
    other = [b["image"].shape for b in batches(src, 20, epoch=2, drop_last=True)]
    assert other != sizes                                                # sizes are redrawn each epoch


def test_the_mixed_grid_command_passes_the_checks_before_training(tmp_path):
    # the README's command: the model probe once compared an int with the list data.grid=[2,3]
    argv = cli.check_command_line(["task=multilabel", "data.grid=[2,3]", "data.max_items=9",
                                   f"hydra.run.dir={tmp_path / 'run'}"])
    assert "data.grid=[2,3]" in argv
    build.probe(compose_config(["task=multilabel", "data.grid=[3,2]"]))
