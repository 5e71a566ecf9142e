"""A user's own labelled pictures: class folders or a CSV, read, converted, split and checked; every task on them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnrnn import stages
from cnnrnn.config import preset
from cnnrnn.data import folder, pictures, sources
from cnnrnn.errors import UserError

CLASSES = ("circle", "cross", "square")


def drawing(cls: int, i: int, size: int, dark: bool = False) -> np.ndarray:
    """A learnable picture: class c is a bright bar at a class-specific height, with a little noise."""
    rng = np.random.default_rng(1000 * cls + i)
    a = rng.integers(0, 30, (size, size)).astype(np.uint8)
    top = size * (2 * cls + 1) // 8
    a[top:top + max(2, size // 8), size // 6: size - size // 6] = 220
    return 255 - a if dark else a


def save(a: np.ndarray, path: Path, i: int) -> None:
    """Mixed formats and modes: PNG gray, JPEG RGB, BMP palette, 16-bit PNG, RGBA PNG."""
    kind = i % 5
    path = path.with_suffix((".png", ".jpg", ".bmp", ".png", ".png")[kind])
    img = Image.fromarray(a)
    if kind == 1:
        img = img.convert("RGB")
    elif kind == 2:
        img = img.convert("P")
    elif kind == 3:
        img = Image.fromarray(a.astype(np.uint16) * 257)
    elif kind == 4:
        img = img.convert("RGBA")
    img.save(path)


def make_folder(root: Path, per_class: int = 30, splits=("train", "test"), dark: bool = False) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            split = splits[i % len(splits)] if splits else None
            folder_ = root / split / name if split else root / name
            folder_.mkdir(parents=True, exist_ok=True)
            save(drawing(c, i, (24, 40, 33)[i % 3], dark), folder_ / f"{name}_{i}", i)
    return root


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("user") / "shapes")


def data(path: Path, **keys) -> object:
    return preset("cnn", data={"source": "folder", "path": str(path), "cache": None, **keys}).data


def test_a_folder_with_train_and_test_is_read_split_and_described(user_folder, caplog):
    (user_folder / "README.md").write_text("my notes")
    with caplog.at_level(logging.WARNING, "cnnrnn"):
        splits, fmt = sources.load(data(user_folder))
    assert fmt.classes == CLASSES and (fmt.size, fmt.channels, fmt.flips) == (28, 1, False)
    assert {k: len(v) for k, v in splits.items()} == {"train": 41, "val": 4, "test": 45}  # val: 10% of train
    assert splits["train"].images.shape[1:] == (1, 28, 28) and splits["train"].images.dtype == torch.uint8
    assert all(f.startswith("test/") for f in splits["test"].files) and "README.md ignored" in caplog.text
    assert 0 < fmt.mean[0] < 0.5 and fmt.background[0] < 30       # the noise's tone, not a bar's
    again, _ = sources.load(data(user_folder))
    assert torch.equal(again["val"].images, splits["val"].images)   # fixed by data.seed
    (user_folder / "README.md").unlink()


def test_every_mode_and_format_of_one_picture_reads_the_same(tmp_path):
    a = drawing(1, 0, 40)
    for i in range(5):
        save(a, tmp_path / f"p{i}", i)
    for p in sorted(tmp_path.iterdir()):
        r = pictures.read(p).astype(int)
        assert r.shape == (40, 40, 1), p
        if p.suffix == ".jpg":  # JPEG's loss, on noise
            assert np.abs(r - a[..., None]).mean() < 8
        else:
            assert np.array_equal(r, a[..., None]), p


def test_transparent_pixels_are_read_as_black_and_said_only_where_there_are_some(tmp_path):
    a = drawing(1, 0, 20)
    rgba = np.dstack([a, a, a, np.full_like(a, 255)])
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    rgba[:10, :, 3] = 0                                 # the top half transparent
    Image.fromarray(rgba).save(tmp_path / "half.png")
    said = []
    assert np.array_equal(pictures.read(tmp_path / "opaque.png", warn=said.append)[..., 0], a) and said == []
    half = pictures.read(tmp_path / "half.png", warn=said.append)[..., 0]
    assert (half[:10] == 0).all() and np.array_equal(half[10:], a[10:])
    assert said == [f"{tmp_path / 'half.png'} has transparent pixels; they are read as black."]


def test_class_folders_alone_give_stratified_val_and_test_shares(tmp_path):
    root = make_folder(tmp_path / "flat", per_class=20, splits=())
    splits, fmt = sources.load(data(root, val_size=0.2))
    assert {k: len(v) for k, v in splits.items()} == {"train": 43, "val": 11, "test": 6}  # test 10%, val 20% of rest
    for name in ("val", "test"):
        assert len(set(splits[name].labels.tolist())) == 3    # stratified: every class in each


def csv_of(tmp_path: Path, text: str, files=("a.png", "b.png", "c.png", "d.png")) -> Path:
    for i, f in enumerate(files):
        Image.fromarray(drawing(i % 2, i, 28)).save(tmp_path / f)
    (tmp_path / "labels.csv").write_text(text)
    return tmp_path / "labels.csv"


def test_a_csv_of_items_reads_its_files_labels_and_splits(tmp_path):
    path = csv_of(tmp_path, "file,labels,split\na.png,dog,train\nb.png,cat,train\nc.png,dog,test\nd.png,cat,val\n")
    splits, fmt = sources.load(preset("cnn", data={"source": "csv", "path": str(path), "cache": None}).data)
    assert fmt.classes == ("cat", "dog") and [s.files for s in splits.values()] == [["a.png", "b.png"], ["d.png"],
                                                                                     ["c.png"]]
    assert folder.list_csv(path, " ", "auto").pictures is False


@pytest.mark.parametrize("text, words", [
    ("name,labels\na.png,dog\n", "needs a header row with a file column (file, file_name, fname, filename)"),
    ("file,labels\na.png,dog\na.png,cat\n", "lines 2 and 3 both name a.png; keep one row per file"),
    ("file,labels\nmissing.png,dog\n", "line 2: the file 'missing.png' does not exist"),
    ("file,labels,split\na.png,dog,training\n", "line 2: split 'training' must be train, val or test"),
    ("file,labels\na.png,dog\nb.png,\n", "line 3: an item with no label"),
    ("file,labels\na.png,dog\nb.png,dog\n", "names a single class (dog); a classifier needs at least two"),
    ("file,labels,split\na.png,dog,train\nb.png,cat,test\n", "no training pictures of cat"),
    ("file,labels,split\na.png,dog,train\nb.png,cat,\n", "line 3: no split while other rows have one"),
])
def test_a_bad_csv_is_one_sentence_naming_the_line(tmp_path, text, words):
    path = csv_of(tmp_path, text)
    with pytest.raises(UserError) as refused:
        sources.load(preset("cnn", data={"source": "csv", "path": str(path), "val_size": 1, "cache": None}).data)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_bad_folders_and_files_are_one_sentence_or_skipped_when_asked(tmp_path, caplog):
    (tmp_path / "labels.csv").write_bytes("file,labels\né.png,chien\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        sources.load(preset("cnn", data={"source": "csv", "path": str(tmp_path / "labels.csv"), "cache": None}).data)
    root = make_folder(tmp_path / "f", per_class=10)
    (root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="empty is a class folder with no pictures"):
        sources.load(data(root))
    (root / "train" / "empty").rmdir()
    (root / "train" / "circle" / "broken.png").write_text("not a picture")
    with pytest.raises(UserError, match=r"broken.png is not a readable image .*set data.skip_bad=true"):
        sources.load(data(root))
    with caplog.at_level(logging.WARNING, "cnnrnn"):
        splits, _ = sources.load(data(root, skip_bad=True))
    assert "1 files that cannot be read left out" in caplog.text and sum(map(len, splits.values())) == 30
    with pytest.raises(UserError, match="holds no class folders of pictures"):
        sources.load(data((tmp_path / "none").mkdir() or tmp_path / "none"))


def test_dark_items_on_white_make_composites_with_white_empty_cells(tmp_path):
    root = make_folder(tmp_path / "dark", per_class=12, dark=True)
    cfg = preset("multilabel", data={"source": "folder", "path": str(root), "cache": None})
    splits, fmt = sources.load(cfg.data)
    assert fmt.background[0] > 200
    from cnnrnn.tasks import make_task

    test = make_task(cfg, fmt).sources(cfg, splits).test
    batch = test.batch(test.order(None)[:40])
    cells = batch["image"].view(40, 1, 2, 28, 2, 28).permute(0, 2, 4, 1, 3, 5).reshape(40, 4, -1)
    empty = batch["cells"] < 0
    assert empty.any() and (cells[empty] == fmt.background[0]).all()


def test_the_reader_cache_key_covers_the_data(tmp_path):
    a, b = make_folder(tmp_path / "a", per_class=6), make_folder(tmp_path / "b", per_class=6)
    digests = [stages.recipe_digest(stages.reader_config(preset("multilabel", data={"source": "folder",
                                                                                     "path": str(p)})))
               for p in (a, b, a)]
    assert digests[0] != digests[1] and digests[0] == digests[2]
    Image.fromarray(drawing(0, 99, 28)).save(a / "train" / "circle" / "new.png")
    assert stages.recipe_digest(stages.reader_config(preset("multilabel", data={"source": "folder",
                                                                                "path": str(a)}))) != digests[0]


def test_fashion_mnist_settings_are_refused_for_what_they_cannot_mean():
    with pytest.raises(UserError, match="data.path=x is for data.source=folder or csv"):
        preset("cnn", data={"path": "x"})
    with pytest.raises(UserError, match="data.source=folder needs data.path"):
        preset("cnn", data={"source": "folder"})
    with pytest.raises(UserError, match="Fashion-MNIST items are 28x28 gray"):
        preset("cnn", data={"size": 32})
    with pytest.raises(UserError, match=r"data.val_size=1.5 must be a count \(at least 1\), a share in \(0, 1\)"):
        preset("cnn", data={"source": "folder", "path": "x", "val_size": 1.5})
    assert json.loads(json.dumps(preset("cnn", data={"source": "csv", "path": "l.csv"}).to_dict()))["data"]["path"]


def test_a_cnn_on_a_users_folder_names_its_classes_in_every_output(user_folder, tmp_path, capsys, onnx_ready):
    from conftest import run_main

    from cnnrnn import evaluate, export, predict

    cfg = preset("cnn", data={"source": "folder", "path": str(user_folder), "epoch_size": 400,
                              "cache": str(tmp_path / "cache")},
                 model={"channels": [4, 8], "hidden": 16}, trainer={"epochs": 3, "batch_size": 20, "progress": False},
                 optim={"lr": 1e-2})
    metrics = stages.run(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert metrics["test/acc"] > 0.9 and {f"test/acc/{c}" for c in CLASSES} <= set(metrics)
    assert (run / "splits.csv").read_text().splitlines()[0] == "file,split"
    rows = (run / "test_predictions.csv").read_text().splitlines()
    assert rows[0] == "item,true,predicted,circle,cross,square" and rows[1].startswith("test/")
    # predict on the user's own files of any size and mode, a whole tree
    code, out, err = run_main(capsys, predict.main, run / "checkpoints" / "best.pt", user_folder / "test", "--top-k",
                              "2")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 45 and set(lines[0]["scores"]) == set(CLASSES) and len(lines[0]["top"]) == 2
    right = sum(line["labels"] == [Path(line["image"]).parent.name] for line in lines)
    assert right >= 40, err
    # ONNX: the same names for the same files
    export.export_checkpoint(run / "checkpoints" / "best.pt", tmp_path / "m.onnx")
    code, onnx_out, _ = run_main(capsys, predict.main, tmp_path / "m.onnx", user_folder / "test")
    assert [json.loads(line)["labels"] for line in onnx_out.splitlines()] == [line["labels"] for line in lines]
    # evaluate on another labelled folder of the same classes, and a mismatch of names refused
    scored = evaluate.evaluate_checkpoint(run / "checkpoints" / "best.pt", data=str(user_folder / "test"))
    assert scored["test/items"] == 45 and scored["test/acc"] == right / 45
    (tmp_path / "other" / "dog").mkdir(parents=True)
    Image.fromarray(drawing(0, 0, 28)).save(tmp_path / "other" / "dog" / "d.png")
    with pytest.raises(UserError, match="names the classes dog, but the model knows circle, cross, square"):
        evaluate.evaluate_checkpoint(run / "checkpoints" / "best.pt", data=str(tmp_path / "other"))


def test_composites_of_a_users_items_train_the_reader_stage_and_the_decoder(user_folder, tmp_path):
    cfg = preset("multilabel", data={"source": "folder", "path": str(user_folder), "epoch_size": 200,
                                     "val_composites": 100, "test_size": 100, "cache": str(tmp_path / "cache")},
                 model={"channels": [4, 8], "cell_dim": 16, "embed": 8, "hidden": 16, "attn_dim": 8},
                 trainer={"epochs": 1, "batch_size": 20, "progress": False},
                 reader={"epochs": 1, "cache": str(tmp_path / "readers")})
    metrics = stages.run(cfg, tmp_path / "run")
    assert {f"test/f1/{c}" for c in CLASSES} <= set(metrics) and "oracle/f1_samples" in metrics
    reader = next((tmp_path / "readers").glob("reader-*"))
    assert json.loads((reader / "metrics.json").read_text())["params"] > 0


def test_pictures_are_decoded_once_then_read_from_a_checked_cache(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "f", per_class=8)
    d = data(root, cache=str(tmp_path / "cache"))
    first, fmt = sources.load(d)
    (entry,) = (tmp_path / "cache").glob("pictures-*")
    monkeypatch.setattr(folder, "decode", lambda *a, **k: pytest.fail("decoded again"))
    with caplog.at_level(logging.INFO, "cnnrnn"):
        again, fmt_again = sources.load(d)
    assert fmt_again == fmt and all(torch.equal(first[k].images, again[k].images) for k in first)
    assert f"pictures from {entry / 'pictures.pt'}" in caplog.text
    limited, _ = sources.load(data(root, cache=str(tmp_path / "cache"), limit=5))   # limit: after the cache
    assert len(limited["train"]) == 5 and len(list((tmp_path / "cache").glob("pictures-*"))) == 1
    (entry / "pictures.pt").write_bytes(b"damaged")
    with pytest.raises(UserError, match=rf"The cached pictures in {entry} cannot be used .*delete that folder"):
        sources.load(d)


def test_a_stop_while_the_cache_is_built_leaves_no_entry_and_the_next_run_builds_it(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "f", per_class=6)
    d = data(root, cache=str(tmp_path / "cache"))
    real = folder.convert

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(folder, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sources.load(d)
    assert not list((tmp_path / "cache").glob("pictures-*"))       # only the partial folder, never published
    monkeypatch.setattr(folder, "convert", real)
    splits, _ = sources.load(d)
    assert len(list((tmp_path / "cache").glob("pictures-*"))) == 1 and len(splits["train"]) > 0


def picture_csv(root: Path, n: int = 60, canvas: int = 48) -> Path:
    """A CSV of multi-label pictures (no item labels): 0-2 of the drawings at free positions, some empty."""
    rng = np.random.default_rng(0)
    (root / "pics").mkdir(parents=True)
    rows = ["file,labels"]
    for i in range(n):
        picture, names = np.zeros((canvas, canvas), np.uint8), []
        for c in sorted(rng.choice(3, size=int(rng.integers(0, 3)), replace=False)):
            y, x = rng.integers(0, canvas - 24, size=2)
            picture[y:y + 24, x:x + 24] = np.maximum(picture[y:y + 24, x:x + 24], drawing(int(c), i, 24))
            names.append(CLASSES[c])
        Image.fromarray(picture).save(root / "pics" / f"{i}.png")
        rows.append(f"pics/{i}.png,{' '.join(names)}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_a_csv_of_multi_label_pictures_trains_the_picture_encoder_and_predicts_names(tmp_path, capsys, onnx_ready):
    from cnnrnn import export, predict
    from conftest import run_main

    path = picture_csv(tmp_path)
    cfg = preset("multilabel", data={"source": "csv", "path": str(path), "picture_size": 48, "size": 24,
                                     "cache": None, "epoch_size": 60},
                 model={"channels": [4, 8], "cell_dim": 16, "embed": 8, "hidden": 16, "attn_dim": 8},
                 trainer={"epochs": 1, "batch_size": 10, "progress": False})
    assert stages.prepare(cfg, tmp_path / "run")[1] == []          # no items: no reader stage
    splits, fmt = sources.load(cfg.data)
    assert fmt.picture == 48 and splits["train"].labels.shape[1] == 3 and (splits["train"].labels.sum(1) == 0).any()
    metrics = stages.run(cfg, tmp_path / "run")
    assert {f"test/f1/{c}" for c in CLASSES} <= set(metrics) and "oracle/f1_samples" not in metrics
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    code, out, err = run_main(capsys, predict.main, best, tmp_path / "pics" / "1.png", tmp_path / "pics" / "2.png")
    assert code == 0, err
    assert all(set(json.loads(line)["scores"]) == set(CLASSES) for line in out.splitlines())
    export.export_checkpoint(best, tmp_path / "m.onnx")
    code, onnx_out, _ = run_main(capsys, predict.main, tmp_path / "m.onnx", tmp_path / "pics" / "1.png",
                                 tmp_path / "pics" / "2.png")
    assert [json.loads(line)["labels"] for line in onnx_out.splitlines()] == [
        json.loads(line)["labels"] for line in out.splitlines()]
    with pytest.raises(UserError, match="holds multi-label pictures"):
        sources.load(preset("cnn", data={"source": "csv", "path": str(path), "cache": None}).data) and \
            stages.run(preset("cnn", data={"source": "csv", "path": str(path), "cache": None}), tmp_path / "c")
