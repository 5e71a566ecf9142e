"""predict and evaluate on checkpoints: PNG round trip, RGB, sizes, bad images, metrics.json reproduced."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnrnn import build, predict
from cnnrnn.cli import compose_config
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import CLASSES, splits
from cnnrnn.engine import save_checkpoint
from cnnrnn.evaluate import evaluate_checkpoint
from cnnrnn.train import run
from conftest import tiny


def write_checkpoint(path, task: str, root) -> None:
    """An untrained but complete checkpoint: enough to check that predict reads what the model sees."""
    cfg = compose_config([f"task={task}", f"data.root={root}", "model.channels=[4,8]"])
    torch.manual_seed(0)
    model = build.model(cfg)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "task_state": {}})


def composites(root, n: int = 12):
    data = splits(root, val_size=100)
    src = CompositeSource(data["test"], size=n, seed=4, fixed=True)
    return src.batch(src.order(None))


def run_predict(capsys, *args) -> tuple[int, list[dict], str]:
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("task", ["multilabel", "multilabel_bce"])
def test_png_round_trip_gives_the_in_memory_labels(fake_root, tmp_path, capsys, task):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, task, fake_root)
    batch = composites(fake_root)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(batch["image"]):
        Image.fromarray(img.numpy()).save(folder / f"{i:02d}.png")
    Image.fromarray(batch["image"][0].numpy()).convert("RGB").save(tmp_path / "rgb.png")
    code, records, err = run_predict(capsys, ckpt, folder, tmp_path / "rgb.png")
    assert code == 0, err
    from cnnrnn.engine import load_checkpoint
    _, model, task_obj = build.from_checkpoint(load_checkpoint(ckpt), ckpt)
    expected, _ = predict.predict(model, task_obj, batch["image"])
    assert [r["labels"] for r in records[:-1]] == [[CLASSES[i] for i in e] for e in expected]
    assert records[-1]["labels"] == records[0]["labels"]  # RGB is converted to the same gray image
    assert records[0]["image"].endswith("00.png") and set(records[0]["scores"]) == set(CLASSES)


def test_bad_images_are_reported_and_the_rest_predicted(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    good, wrong_size, not_image = tmp_path / "good.png", tmp_path / "big.png", tmp_path / "notes.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(wrong_size)
    not_image.write_text("not an image")
    (tmp_path / "empty").mkdir()
    code, records, err = run_predict(capsys, ckpt, not_image, wrong_size, good, tmp_path / "empty")
    assert code == 2 and [r["image"] for r in records] == [str(good)]
    assert "notes.png is not a readable image" in err and "big.png is 30x30 pixels" in err and "--resize" in err
    assert "empty holds no image files" in err and "Traceback" not in err
    code, records, err = run_predict(capsys, ckpt, wrong_size, "--resize")
    assert code == 0 and len(records) == 1


def test_evaluate_reproduces_metrics_json(fake_root, tmp_path):
    out = tmp_path / "run"
    run(compose_config(["task=multilabel_bce", *tiny(fake_root, "data.test_size=100", "model.channels=[4,8]")]),
        out)
    saved = json.loads((out / "metrics.json").read_text())
    again = evaluate_checkpoint(out / "checkpoints" / "best.pt")
    assert again == saved
