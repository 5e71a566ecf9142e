"""Scenes: which items go together in a composite, from a scene file; refused files in one sentence."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_composites

from cnnrnn.config import CONFIG_DIR
from cnnrnn.data.composite import multi_hot
from cnnrnn.data.fashion_mnist import CLASSES
from cnnrnn.data.items import Split
from cnnrnn.data.scene import (
    Scene,
    format_statistics,
    item_of_class,
    label_statistics,
    read_scene,
)
from cnnrnn.errors import UserError

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
    src = make_composites(tagged_split(500), 20_000, scene=Scene(TWO_STYLES, "scene", CLASSES), seed=1, fixed=True)
    layout = src.order(None)
    stats = label_statistics(multi_hot(torch.where(layout >= 0, src.split.labels[layout.clamp(min=0)], -1), 10))
    freq, cond = stats["freq"], stats["cond"]
    assert freq[COAT] == pytest.approx(0.5, abs=0.02) and freq[TSHIRT] == pytest.approx(0.5, abs=0.02)
    assert cond[COAT][TROUSER] == pytest.approx(0.6, abs=0.02)     # P(Trouser | Coat): the slot's p
    assert cond[TSHIRT][SANDAL] == pytest.approx(0.8, abs=0.02)
    assert cond[COAT][TSHIRT] == 0 and cond[COAT][SANDAL] == 0     # never across styles
    assert sum(freq) == pytest.approx(1 + 0.5 * 0.6 + 0.5 * 0.8, abs=0.03)  # labels per image


def test_outfit_scene_carries_much_more_context_than_uniform():
    outfit = Scene(read_scene("outfit", CONFIG_DIR / "scene", CLASSES), "outfit", CLASSES)
    split = tagged_split(1000)
    rich = make_composites(split, 10, scene=outfit).statistics(20_000)
    flat = make_composites(split, 10).statistics(20_000)
    assert rich["total_correlation"] > 1.0 > 0.3 > flat["total_correlation"]
    assert "total correlation" in format_statistics(rich, CLASSES) and len(format_statistics(rich, CLASSES).splitlines()) == 13


def test_scene_composites_use_only_their_split_and_replay_by_seed():
    scene = Scene(read_scene("outfit", CONFIG_DIR / "scene", CLASSES), "outfit", CLASSES)
    split = Split(torch.full((300, 28, 28), 77, dtype=torch.uint8), torch.arange(300) % 10)
    a = make_composites(split, 200, scene=scene, seed=4, fixed=True)
    b = make_composites(split, 200, scene=scene, seed=4, fixed=True)
    assert torch.equal(a.order(None), b.order(None))
    assert not torch.equal(a.order(None), make_composites(split, 200, scene=scene, seed=5, fixed=True).order(None))
    batch = a.batch(a.order(None))
    assert set(batch["image"].unique().tolist()) == {0, 77}
    layout = a.order(None)
    assert ((layout >= 0).sum(1) >= 1).all() and ((layout >= 0).sum(1) <= 4).all()
    assert torch.equal(batch["cells"], torch.where(layout >= 0, split.labels[layout.clamp(min=0)], -1))


def test_items_of_a_class_are_drawn_from_that_class_and_a_missing_class_is_refused():
    labels = torch.tensor([3, 1, 3, 0, 1, 3, 2, 4, 5, 6, 7, 8, 9])
    cls = torch.tensor([3, 3, 1, 0])
    picked = item_of_class(labels, cls, torch.tensor([0.0, 0.99, 0.5, 0.3]), 10)
    assert labels[picked].tolist() == cls.tolist()
    scene = Scene(read_scene("outfit", CONFIG_DIR / "scene", CLASSES), "outfit", CLASSES)
    with pytest.raises(UserError, match="no item of class Ankle boot.*raise data.limit"):
        scene.sample(4, labels[:-1], 2, 1, 4, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec, message", [
    ({"styles": {}}, "no 'styles'"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1, "classes": {"Hat": 1}}]}}}, "'Hat', which is not one of"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1.5, "classes": {"Bag": 1}}]}}}, r"p is 1.5; it must be"),
    ({"styles": {"a": {"p": 1, "slots": [{"p": 1, "classes": {"Bag": 0}}]}}}, "every class weight 0"),
    ({"styles": {"a": {"p": 1}}}, "list of 'slots'"),
    ({"styles": {"a": {"p": 0, "slots": [{"p": 1, "classes": {"Bag": 1}}]}}}, "every style probability 0"),
    ({"noise": 2, "styles": {"a": {"p": 1, "slots": [{"p": 1, "classes": {"Bag": 1}}]}}}, "noise is 2"),
])
def test_bad_scene_specs_are_refused_in_one_sentence(spec, message):
    with pytest.raises(UserError, match=message):
        Scene(spec, "scene", CLASSES)


def test_unknown_scene_name_and_unreadable_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="data.scene=outfitt: no scene file .* choose uniform or one of outfit"):
        read_scene("outfitt", CONFIG_DIR / "scene", CLASSES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("styles: [unclosed\n")
    with pytest.raises(UserError, match="not readable YAML"):
        read_scene(str(bad), CONFIG_DIR / "scene", CLASSES)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="does not hold a mapping"):
        read_scene(str(listed), CONFIG_DIR / "scene", CLASSES)
    assert read_scene("uniform", CONFIG_DIR / "scene", CLASSES) is None


def test_scene_files_shipped_parse():
    shipped = sorted(Path(CONFIG_DIR / "scene").glob("*.yaml"))
    assert shipped
    for path in shipped:
        Scene(read_scene(str(path), CONFIG_DIR / "scene", CLASSES), "s", CLASSES)
