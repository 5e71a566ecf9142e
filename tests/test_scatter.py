"""Items anywhere: placement, overlap, clutter, the picture encoder's run with its box oracle and grounding."""
from __future__ import annotations

import json

import torch
from conftest import tiny

from cnnrnn import checkpoint, stages
from cnnrnn.data.items import Split
from cnnrnn.data.scatter import OVERLAP, ScatterSource


def random_split(n: int) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(1, 255, (n, 28, 28), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


def test_scattered_items_stay_on_the_canvas_overlap_little_and_combine_by_their_maximum():
    split = random_split(50)
    source = ScatterSource(split, 200, 64, 1, 4, seed=3, fixed=True)
    batch = source.batch(source.order(None))
    cells, boxes = batch["cells"], batch["boxes"]
    present = cells >= 0
    assert ((1 <= present.sum(1)) & (present.sum(1) <= 4)).all() and (present.sum(1) == 4).any()
    assert ((boxes >= 0) & (boxes <= 64 - 28)).all()
    for b in range(len(cells)):
        corners = boxes[b][present[b]]
        for i in range(len(corners)):
            for j in range(i):
                shared = (28 - (corners[i] - corners[j]).abs()).clamp(min=0).prod()
                assert shared <= OVERLAP * 28 * 28
        # reading order of the corners
        keys = corners[:, 0] * 64 + corners[:, 1]
        assert torch.equal(keys, keys.sort().values)
    # one picture by hand: the maximum of its items at their corners, black elsewhere
    layout = source.order(None)[:1]
    b = source.batch(layout)
    canvas = torch.zeros(1, 64, 64, dtype=torch.uint8)
    for slot, (y, x) in zip(layout[0, :, 0], b["boxes"][0]):
        if slot >= 0:
            canvas[:, y:y + 28, x:x + 28] = torch.maximum(canvas[:, y:y + 28, x:x + 28], split.images[slot])
    assert torch.equal(b["image"][0], canvas)
    assert torch.equal(b["labels"][0].nonzero().flatten(), split.labels[layout[0, :, 0][layout[0, :, 0] >= 0]].unique())


def test_clutter_adds_fragments_of_items_but_no_labels_and_a_training_source_draws_anew():
    split = random_split(50)
    plain = ScatterSource(split, 20, 64, 1, 4, seed=5, fixed=True)
    cluttered = ScatterSource(split, 20, 64, 1, 4, seed=5, fixed=True, clutter=2)
    a, b = (s.batch(s.order(None)) for s in (plain, cluttered))
    assert all(torch.equal(a[k], b[k]) for k in ("cells", "boxes", "labels"))
    assert (b["image"] >= a["image"]).all() and (b["image"] > a["image"]).any()
    training = ScatterSource(split, 20, 64, 1, 4, seed=5)
    assert not torch.equal(training.order(0), training.order(1))


def test_a_scattered_run_trains_the_picture_encoder_on_a_frozen_reader_with_a_box_oracle_and_grounding(fake_root,
                                                                                                      tmp_path):
    cfg = tiny(fake_root, "multilabel", data={"layout": "scatter", "picture_size": 56, "max_items": 3},
               trainer={"epochs": 1})
    metrics = stages.run(cfg, tmp_path / "run")
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert saved["config"]["model"]["encoder"] == "auto" and saved["task_state"]["steps"] == 3
    assert metrics["oracle/f1_samples"] > 0       # the box oracle: the reader on each true box
    # grounding counts only the labels named right, which a model of one tiny epoch may not have: where it has any,
    # it is a share, in metrics.json too
    assert 0 <= metrics.get("test/grounding", 0) <= 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()).get("test/grounding") == metrics.get(
        "test/grounding")
