"""Context a decoder can use: scene files, degraded items, the feedback ablation and the grounding metric."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from cnnrnn.config import CONFIG_DIR
from cnnrnn.data.composite import CompositeSource, cell_crops
from cnnrnn.data.degrade import degrade
from cnnrnn.data.fashion_mnist import CLASSES, Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.data.scene import Scene, label_statistics, read_scene
from cnnrnn.errors import UserError
from cnnrnn.metrics import grounding
from cnnrnn.models import build_model
from conftest import PYTHON, ROOT, cli_env

COAT, TROUSER, TSHIRT, SANDAL = (CLASSES.index(c) for c in ("Coat", "Trouser", "T-shirt/top", "Sandal"))
TWO_STYLES = {"noise": 0.0, "styles": {
    "cold": {"p": 0.5, "slots": [{"p": 1.0, "classes": {"Coat": 1}}, {"p": 0.6, "classes": {"Trouser": 1}}]},
    "warm": {"p": 0.5, "slots": [{"p": 1.0, "classes": {"T-shirt/top": 1}}, {"p": 0.8, "classes": {"Sandal": 1}}]},
}}


def tagged_split(n: int, tag: int = 0) -> Split:
    """Items whose pixels tell their index (and a split tag), ten classes in turn."""
    images = ((torch.arange(n) % 200 + 1 + tag)[:, None, None].expand(n, 28, 28)).to(torch.uint8).clone()
    return Split(images, torch.arange(n) % 10)


def test_scene_draws_follow_the_files_co_occurrence():
    src = CompositeSource(tagged_split(500), 20_000, scene=Scene(TWO_STYLES), seed=1, fixed=True)
    stats = label_statistics(src.order(None), src.split.labels)
    freq, cond = stats["freq"], stats["cond"]
    assert freq[COAT] == pytest.approx(0.5, abs=0.02) and freq[TSHIRT] == pytest.approx(0.5, abs=0.02)
    assert cond[COAT][TROUSER] == pytest.approx(0.6, abs=0.02)     # P(Trouser | Coat): the slot's p
    assert cond[TSHIRT][SANDAL] == pytest.approx(0.8, abs=0.02)
    assert cond[COAT][TSHIRT] == 0 and cond[COAT][SANDAL] == 0     # never across styles
    assert sum(freq) == pytest.approx(1 + 0.5 * 0.6 + 0.5 * 0.8, abs=0.03)  # labels per image


def test_outfit_scene_carries_much_more_context_than_uniform():
    outfit = Scene(read_scene("outfit", CONFIG_DIR / "scene"))
    split = tagged_split(1000)
    rich = CompositeSource(split, 10, scene=outfit).statistics(20_000)
    flat = CompositeSource(split, 10).statistics(20_000)
    assert rich["total_correlation"] > 1.0 > 0.3 > flat["total_correlation"]


def test_scene_composites_use_only_their_split_and_replay_by_seed():
    scene = Scene(read_scene("outfit", CONFIG_DIR / "scene"))
    split = Split(torch.full((300, 28, 28), 77, dtype=torch.uint8), torch.arange(300) % 10)
    a = CompositeSource(split, 200, scene=scene, seed=4, fixed=True)
    b = CompositeSource(split, 200, scene=scene, seed=4, fixed=True)
    assert torch.equal(a.order(None), b.order(None))
    assert not torch.equal(a.order(None), CompositeSource(split, 200, scene=scene, seed=5, fixed=True).order(None))
    batch = a.batch(a.order(None))
    assert set(batch["image"].unique().tolist()) == {0, 77}
    layout = a.order(None)
    assert ((layout >= 0).sum(1) >= 1).all() and ((layout >= 0).sum(1) <= 4).all()
    assert torch.equal(batch["cells"], torch.where(layout >= 0, split.labels[layout.clamp(min=0)], -1))


@pytest.mark.parametrize("spec, message", [
    ({"styles": {}}, "no 'styles'"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1, "classes": {"Hat": 1}}]}}}, "'Hat', which is not one of"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1.5, "classes": {"Bag": 1}}]}}}, r"p is 1.5; it must be"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1, "classes": {"Bag": 0}}]}}}, "every class weight 0"),
    ({"styles": {"a": {"p": 1}}}, "list of 'slots'"),
])
def test_bad_scene_specs_are_refused_in_one_sentence(spec, message):
    with pytest.raises(UserError, match=message):
        Scene(spec)


def test_unknown_scene_name_and_unreadable_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="no scene file .* choose uniform or one of outfit"):
        read_scene("outfitt", CONFIG_DIR / "scene")
    bad = tmp_path / "bad.yaml"
    bad.write_text("styles: [unclosed\n")
    with pytest.raises(UserError, match="not readable YAML"):
        read_scene(str(bad), CONFIG_DIR / "scene")
    proc = subprocess.run([PYTHON, "-m", "cnnrnn.train", "data.scene=outfitt"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.scene=outfitt: no scene file")


def test_degrade_is_off_at_zero_and_fixed_per_image_for_val_and_test():
    split = Split(torch.randint(0, 256, (100, 28, 28), dtype=torch.uint8), torch.arange(100) % 10)
    clean = CompositeSource(split, 40, seed=2, fixed=True)
    assert torch.equal(degrade(split.images, torch.arange(100), 0.0), split.images)
    fixed = CompositeSource(split, 40, seed=2, fixed=True, degrade=0.5)
    layout = fixed.order(None)
    whole = fixed.batch(layout, key=1)["image"]
    parts = torch.cat([fixed.batch(layout[:13], key=7)["image"], fixed.batch(layout[13:], key=9)["image"]])
    assert torch.equal(whole, parts)                                  # any batching, any key: the same image
    assert not torch.equal(whole, clean.batch(layout)["image"])
    empty = cell_crops(whole, 2)[layout < 0]
    assert empty.max() == 0                                           # empty cells stay black
    train = CompositeSource(split, 40, seed=2, degrade=0.5)
    rows = train.order(0)
    assert not torch.equal(train.batch(rows, key=1)["image"], train.batch(rows, key=2)["image"])
    assert torch.equal(train.batch(rows, key=1)["image"], train.batch(rows, key=1)["image"])
    items = ItemSource(split, seed=3, degrade=0.5)
    assert torch.equal(items.batch(torch.arange(10))["image"], items.batch(torch.arange(10), key=5)["image"])


def test_degrade_strength_hides_more_of_the_item():
    items = torch.full((200, 28, 28), 200, dtype=torch.uint8)
    diffs = [(degrade(items, torch.arange(200), s).float() - 200).abs().mean() for s in (0.2, 0.5, 0.9)]
    assert diffs[0] < diffs[1] < diffs[2]


def test_feedback_off_ignores_the_fed_label():
    torch.manual_seed(0)
    kw = dict(channels=(4, 8), cell=0, embed=8, hidden=16, attn_dim=8, dropout=0.0)
    x = torch.randn(5, 1, 56, 56)
    a, b = torch.tensor([[1, 2, 3, 10, 0]] * 5), torch.tensor([[7, 8, 9, 10, 0]] * 5)
    ablated = build_model("cnn_rnn", feedback=False, **kw).eval()
    assert torch.equal(ablated(x, a), ablated(x, b))
    full = build_model("cnn_rnn", **kw).eval()
    out_a, out_b = full(x, a), full(x, b)
    assert torch.equal(out_a[:, 0], out_b[:, 0]) and not torch.allclose(out_a[:, 1:], out_b[:, 1:])


def test_step_logits_do_not_depend_on_the_teacher_label_of_that_step():
    """Causality: the target at step t is fed only after step t's logits are made."""
    torch.manual_seed(0)
    model = build_model("cnn_rnn", channels=(4, 8), cell=0, embed=8, hidden=16, attn_dim=8, dropout=0.0).eval()
    x = torch.randn(3, 1, 56, 56)
    tokens = torch.tensor([[1, 2, 3, 10, 0]] * 3)
    base = model(x, tokens)
    for t in range(4):
        changed = tokens.clone()
        changed[:, t] = 5
        out = model(x, changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1])


def test_grounding_is_one_on_the_right_cell_and_zero_on_a_wrong_one():
    cells = torch.tensor([[COAT, TROUSER, -1, COAT], [SANDAL, -1, -1, -1]])
    y = torch.zeros(2, 10)
    y[0, [COAT, TROUSER]] = 1
    y[1, SANDAL] = 1
    tokens = torch.tensor([[TROUSER, COAT, 10], [SANDAL, 10, 10]])
    right = torch.zeros(2, 3, 4)
    right[0, 0, 1] = 1   # Trouser at cell 1; Coat sits in two cells and does not count
    right[1, 0, 0] = 1
    assert grounding(tokens, right, cells, y) == {"grounding": 1.0, "grounding_mass": 1.0}
    wrong = torch.zeros(2, 3, 4)
    wrong[0, 0, 2] = wrong[1, 0, 3] = 1
    assert grounding(tokens, wrong, cells, y) == {"grounding": 0.0, "grounding_mass": 0.0}
    # a wrongly emitted label does not count; a finer map (2x2 positions per cell) is pooled per cell
    fine = torch.zeros(2, 3, 16)
    fine[:, 0, 0] = 0.75
    fine[:, 0, 15] = 0.25
    out = grounding(torch.tensor([[TSHIRT, 10, 10], [SANDAL, 10, 10]]), fine, cells, y)
    assert out == {"grounding": 1.0, "grounding_mass": 0.75}


def test_scene_files_shipped_parse():
    for path in sorted(Path(CONFIG_DIR / "scene").glob("*.yaml")):
        Scene(read_scene(str(path), CONFIG_DIR / "scene"))
